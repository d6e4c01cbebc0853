"""What the `bin/` tools call: flag plumbing and one `*_from_flags` per tool (the top layer)."""
