"""What several tests share: reference implementations in upstream's style (PyTorch, skimage + cv2),
the golden sharding specs, and the scripts that tests run in a subprocess (8 simulated devices,
distributed workers, a training run to kill)."""
