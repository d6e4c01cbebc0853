"""Image-classification sources (paper §4.2): see `lo_tf.data.sources`."""
