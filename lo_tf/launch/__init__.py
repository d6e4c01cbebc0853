"""What the `bin/` tools call: flag and gin plumbing, and one `*_from_flags` per tool."""
