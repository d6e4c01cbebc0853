"""Outer-training: truncated unrolls, the merged RP/ES estimator, the curriculum (paper §2-§4.3)."""
