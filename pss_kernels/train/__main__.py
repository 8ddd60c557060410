"""`python -m pss_kernels.train ...` / `pss-train ...` (also under torchrun); `--help` lists the flags."""
from __future__ import annotations

import sys
import traceback
from typing import Optional, Sequence

from .._backends import BackendError
from .checkpoint import CheckpointError
from .cli import parse_config
from .distributed import init_distributed, shutdown_distributed
from .optional_deps import MissingDependency
from .trainer import train


def main(argv: Optional[Sequence[str]] = None) -> int:
    config = parse_config(argv)
    try:
        dist_info = init_distributed(config.device)  # refuses --device cuda without CUDA (ValueError)
        train(config, dist_info)
    except (CheckpointError, BackendError, MissingDependency, ValueError) as err:
        print(f"pss-train: error: {err}", file=sys.stderr)
        return 2
    except BaseException as err:
        # The traceback's frames hold the trainer, DDP and so the process group: cleared, shutdown can
        # join gloo's workers before the interpreter exits (see shutdown_distributed). It still prints.
        traceback.clear_frames(err.__traceback__)
        raise
    finally:
        shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
