"""Training with a Patch Sampling Schedule: `python -m pss_kernels.train` (or `pss-train`)."""
from .checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from .config import TrainConfig, parse_config, recipe_config
from .distributed import DistInfo, init_distributed
from .recipes import RECIPES
from .trainer import Trainer, build_model, train

__all__ = ["CheckpointError", "DistInfo", "RECIPES", "TrainConfig", "Trainer", "build_model", "init_distributed",
           "load_checkpoint", "parse_config", "recipe_config", "save_checkpoint", "train"]
