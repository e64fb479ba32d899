import os

# Tests run on the CPU in fp32; keep XLA from grabbing every core of a shared CI machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
