#!/usr/bin/env bash
# The package's load_pretrained against timm itself: timm's beit_base_patch16_224,
# deit_small_patch16_224 and vit_base_patch16_224 with random weights, saved as .pth and
# .safetensors (and a SimMIM-layout original checkpoint), loaded into this package's model, give
# timm's logits (tests/timm_equivalence.py; it exits non-zero on any difference).
#
# In a venv of its own: timm needs torchvision, which has no CPU build of the torch pinned for the
# package; torch 2.14.1 + torchvision 0.29.1 (a CUDA build, ~5.5 GB, it runs on CPU) lie on this
# machine's disk and pip installs them from there. The venv is reused when present.
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1
venv="${TMPDIR:-/tmp}/pss-kernels-timm"
if ! "$venv/bin/python" -c "import timm, torchvision, safetensors" 2>/dev/null; then
    python -m venv "$venv"
    "$venv/bin/pip" install -q "torch==2.14.1" "torchvision==0.29.1" timm safetensors numpy
fi
"$venv/bin/python" -c "import torch, torchvision, timm; print('timm equivalence: torch', torch.__version__, \
'torchvision', torchvision.__version__, 'timm', timm.__version__)"
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$venv/bin/python" tests/timm_equivalence.py
