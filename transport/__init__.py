"""Bytes, tensors, peers and time: the wire codec and ZeroMQ request/reply. Knows nothing of transformers."""
