#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in two device calls of < 10 minutes each:
#   bash benchmarks/gpu_session.sh tests   # build _C there, run the `cuda`-marked tests
#   bash benchmarks/gpu_session.sh bench   # benchmarks/ops.py + benchmarks/iter_time.py
# Logs, JSON and PNG land in $OUT (the device tool's output folder), else benchmarks/results/.
# The GPU machines have torch/triton preinstalled and no network: install without isolation.
set -uo pipefail
stage=${1:?usage: gpu_session.sh tests|bench}
out=${OUT:-benchmarks/results}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
pip install --no-build-isolation --no-deps -e . -v 2>&1 | grep -E "pss_kernels:|Successfully|error" | tee "$out/install.log"
python -c "import torch, pss_kernels; print(torch.__version__, torch.version.cuda, pss_kernels.available_backends())" \
    | tee -a "$out/install.log"
case "$stage" in
  tests) python -m pytest -m cuda -q -rfE --durations=10 tests 2>&1 | tee "$out/gpu_tests.log" ;;
  bench) python benchmarks/ops.py --out-dir "$out" 2>&1 | tee "$out/ops.log"
         python benchmarks/iter_time.py --out-dir "$out" 2>&1 | tee "$out/iter_time.log" ;;
  *) echo "unknown stage $stage (tests or bench)"; exit 2 ;;
esac
