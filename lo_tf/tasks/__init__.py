"""Task distributions (paper §4.2) and inner problems (App. C.2, App. E)."""
