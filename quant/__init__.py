"""Weight quantization and wire compression (later issues). Knows tensors, nothing of sockets."""
