"""lo_tf: learned optimizers in TensorFlow 2 (Metz et al.), see README.md."""
