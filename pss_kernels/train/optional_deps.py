"""The optional packages of the trainer and the evaluation sweep: the `train` extra of pyproject.toml
(pillow for --data folder, scikit-learn for --data digits, matplotlib for pss-evaluate's plots, kornia
for the device-side augmentation, safetensors for --init-from *.safetensors)."""
from __future__ import annotations

import importlib
from types import ModuleType

INSTALL_TRAIN_EXTRA = 'pip install "pss-kernels[train]"'


class MissingDependency(ImportError):
    """An optional package is not installed; the one-line message says what to install."""


def require(module: str, package: str, needed_for: str) -> ModuleType:
    """`module` imported, or MissingDependency naming `package` and the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependency(f"{needed_for} needs {package}, which cannot be imported ({err}): "
                                f"{INSTALL_TRAIN_EXTRA} (or pip install {package})") from None
