"""One sub-package per op: reference.py (oracle + CPU path), triton_*.py, cuda.py, op.py (dispatch)."""
