"""The paper's evaluation: FID (Inception-v3 of pytorch-fid), FVD (the Kinetics-400 I3D),
Sync-C / Sync-D (SyncNet v2 of syncnet_python) and E-FID (Deep3DFaceRecon's expression
coefficients), each network equal to its PyTorch original, and `etalk eval` with the paper's
protocol. One module per network (`<net>.py`) with its converter beside it (`<net>_params.py`).
"""
