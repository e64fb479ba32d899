"""Training: the optimizer (8-bit Adam)."""
