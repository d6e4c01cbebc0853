"""Learned-optimizer families (maps θ -> inner optimizer), their interface, shipped ones by name."""
