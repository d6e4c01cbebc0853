"""Outer-training (paper §2-§4.3, App. B): unrolls, estimator, learner, loop, checkpoints, cluster."""
