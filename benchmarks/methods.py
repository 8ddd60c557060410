"""The method comparison harness: `python benchmarks/methods.py [--quick] [--methods ...]`, the same as
the installed `pss-compare` (pss_kernels/compare.py, where its documentation lives)."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pss_kernels.compare import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
