"""Learned optimizers: maps from meta-parameters θ to `lo_tf.optimizers.base.Optimizer`s."""
