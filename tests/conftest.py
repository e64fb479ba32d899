import os
import sys

# Tests run on the CPU in fp32; keep XLA from grabbing every core of a shared CI machine.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(__file__))  # shared reference helpers (svd_reference.py)
