"""Optimizers sharing one functional init/update interface (see `lo_tf.optimizers.base`)."""
