#!/usr/bin/env bash
# Everything a session with a lent GPU runs, in two device calls that each end inside the tool's
# 10-minute limit (and 8 returned files):
#
#   bash benchmarks/gpu_session.sh tests ops    # build _C there, `cuda`-marked tests, benchmarks/ops.py
#   bash benchmarks/gpu_session.sh iter_time    # benchmarks/iter_time.py (the main job)
#   bash benchmarks/gpu_session.sh tune         # benchmarks/tune_rpb_tiles.py (tile sweep), if time is left
#
# Stages run in the order given and share one budget of BUDGET_S seconds (default 540): each
# benchmark gets what is left as its --time-budget (its target cases run first, the rest are
# reported as skipped), and the tests are cut off by `timeout`. Output: $OUT/session.log (all of
# it) plus the benchmarks' JSON and PNG in $OUT (the device tool's output folder; else
# benchmarks/results/). The GPU machines have torch/triton/nvcc preinstalled and no network, so
# the package is installed without build isolation or dependencies.
set -uo pipefail
[ $# -gt 0 ] || { echo "usage: gpu_session.sh STAGE... (stages: tests ops iter_time tune)"; exit 2; }
for stage in "$@"; do
  case "$stage" in tests|ops|iter_time|tune) ;; *) echo "unknown stage $stage (tests, ops, iter_time, tune)"; exit 2 ;; esac
done
out=${OUT:-benchmarks/results}
mkdir -p "$out"
log="$out/session.log"
deadline=$((SECONDS + ${BUDGET_S:-540}))
export PYTHONUNBUFFERED=1
# Seconds left in the budget after keeping $1 in reserve for later stages (at least 30).
left() { local s=$((deadline - SECONDS - ${1:-0})); echo $((s > 30 ? s : 30)); }

{
  # Build _C for this GPU's architecture only (a fresh machine compiles it on every start).
  arch=$(python -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')" 2>/dev/null)
  export PSS_KERNELS_CUDA_ARCHS=${PSS_KERNELS_CUDA_ARCHS:-${arch:-90}}
  echo "== install (CUDA archs $PSS_KERNELS_CUDA_ARCHS), $(left) s left"
  pip install --no-build-isolation --no-deps -e . -v 2>&1 | grep -E "pss_kernels:|Successfully|rror" | tail -20
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader
  python -c "import torch, triton, pss_kernels as p; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'triton', triton.__version__); [print(f'  {k}: {v}') for k, v in p.available_backends().items()]"
  for stage in "$@"; do
    case "$stage" in
      tests)
        # pytest-xdist (in the GPU image) spreads Triton compilation over the cores; a hung test
        # must not eat the call, hence pytest-timeout and the outer timeout.
        workers=$(python -c "import xdist" 2>/dev/null && echo "-n 8" || echo "")
        per_test=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout=300" || echo "")
        echo "== tests ($workers $per_test), $(left) s left"
        timeout -k 20 -s INT "$(left 300)" python -m pytest -m cuda -q -rfE --durations=15 $workers $per_test tests
        echo "pytest exit status $?" ;;
      ops)
        echo "== benchmarks/ops.py, $(left) s left"
        python benchmarks/ops.py --out-dir "$out" --time-budget "$(left 90)" ;;
      iter_time)
        echo "== benchmarks/iter_time.py, $(left) s left"
        python benchmarks/iter_time.py --out-dir "$out" --time-budget "$(left 120)" ;;
      tune)
        echo "== benchmarks/tune_rpb_tiles.py, $(left) s left"
        python benchmarks/tune_rpb_tiles.py --out-dir "$out" --time-budget "$(left 60)" ;;
    esac
  done
  echo "== done, $(left) s of the budget left"
} 2>&1 | tee "$log"
