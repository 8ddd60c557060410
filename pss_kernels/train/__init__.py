"""Training with a Patch Sampling Schedule: `python -m pss_kernels.train` (or `pss-train`)."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .cli import parse_config
from .config import TrainConfig, recipe_config
from .distributed import DistInfo, init_distributed, shutdown_distributed
from .recipes import RECIPES
from .build import build_model
from .trainer import Trainer, train

__all__ = ["CheckpointError", "DistInfo", "RECIPES", "TrainConfig", "Trainer", "build_model", "init_distributed",
           "load_checkpoint", "parse_config", "recipe_config", "save_checkpoint", "shutdown_distributed", "train"]
