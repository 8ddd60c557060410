#!/usr/bin/env bash
# The whole GPU window in ONE device call (a lent GPU gives 15 minutes of device time in all, one
# command at most 10): every stage in priority order inside one budget, each stage cut to what is
# left, the output in at most 8 files.
#
#   bash benchmarks/gpu_session.sh                 # on the GPU machine: every stage
#   bash benchmarks/gpu_session.sh --rehearse      # here / in CI: every stage on CPU, smoke shapes
#   bash benchmarks/gpu_session.sh tests ops       # named stages only, in the order below
#
# Stages, in this order:
#   install    build pss_kernels._C for this GPU's architecture; versions, available_backends()
#   tests      the whole test suite on the GPU: the `cuda`-marked tests first, then the rest, each cut
#              at a time limit; failures listed by name (tests.json + the log)
#   ops        benchmarks/ops.py (sample_patches and rpb_attention against their peers, targets first)
#   iter_time  benchmarks/iter_time.py, the main job (its target cases first, then the grid)
#   sanitizer  compute-sanitizer memcheck and racecheck on benchmarks/sanitize_kernels.py (small shapes)
#   tune       benchmarks/tune_rpb_tiles.py at n = 39 and 197, while time is left
#
# Budget: BUDGET_S seconds in all (default 480, so that machine start, install and the copy back fit
# in the tool's 10-minute command limit). Each stage gets min(its cap, what is left after keeping
# the later stages' reserve); a benchmark gets it as --time-budget (its target cases run first),
# pytest and compute-sanitizer run under `timeout`.
#
# Output in $OUT (the device tool's output folder; without it benchmarks/results, or with --rehearse
# runs/gpu_session_rehearsal): session.log, tests.json, ops_*.json/png, iter_time_*.json/png,
# rpb_tiles_*.json: 7 files. The GPU machine has torch, triton, nvcc, cmake, ninja, pybind11 and no
# network, so the package is installed without build isolation or dependencies.
#
# --rehearse runs the same stages, commands and files on a machine without a GPU: the package is
# installed the same way, the test stage runs the `cuda` tests (they skip) and a small CPU selection,
# the benchmarks run their smoke configurations, the sanitizer stage runs the script without
# compute-sanitizer, the tile sweep runs in the Triton interpreter. Exit status: 1 if a stage failed
# (CI runs the rehearsal, so a broken script is found there, not on the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STAGES=(install tests ops iter_time sanitizer tune)
# The GPU image's interpreter is `python3` (a venv holding torch); `python` may not exist there.
PY=${PYTHON:-$(command -v python3 || command -v python)}
rehearse=0
stages=()
for arg in "$@"; do
  case "$arg" in
    --rehearse) rehearse=1 ;;
    -h|--help) sed -n '2,34p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) if [[ " ${ALL_STAGES[*]} " == *" $arg "* ]]; then stages+=("$arg"); else
         echo "gpu_session.sh: unknown argument '$arg' (stages: ${ALL_STAGES[*]}; flags: --rehearse)" >&2; exit 2; fi ;;
  esac
done
[ ${#stages[@]} -gt 0 ] || stages=("${ALL_STAGES[@]}")
wants() { [[ " ${stages[*]} " == *" $1 "* ]]; }

if [ "$rehearse" = 1 ]; then
  out=${OUT:-runs/gpu_session_rehearsal}
  budget=${BUDGET_S:-1800}
else
  out=${OUT:-benchmarks/results}
  budget=${BUDGET_S:-480}
fi
mkdir -p "$out"
log="$out/session.log"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
deadline=$((SECONDS + budget))
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
[ "$rehearse" = 1 ] && export TRITON_INTERPRET=1

# Seconds a stage may take: min(cap, left - reserve for the later stages), at least 20. The caps are
# the GPU call's; a rehearsal checks that the stages run, on a CPU that may be shared and slow, so
# its caps are 5 times longer (the budget is not the point there).
cap_scale=$([ "$rehearse" = 1 ] && echo 5 || echo 1)
stage_seconds() {
  local cap=$(( $1 * cap_scale )) reserve=$2 left=$((deadline - SECONDS - $2))
  local s=$(( left < cap ? left : cap ))
  echo $(( s > 20 ? s : 20 ))
}
failed=()
record() {  # record <stage> <exit status>
  if [ "$2" -ne 0 ]; then failed+=("$1 (exit status $2)"); fi
  echo "== $1 finished with exit status $2, $((deadline - SECONDS)) s of the budget left"
}

{
  echo "== gpu_session.sh $([ "$rehearse" = 1 ] && echo '--rehearse ')stages: ${stages[*]}; budget ${budget} s; output in $out"

  if wants install; then
    # _C for this GPU's architecture only: a fresh machine compiles it on every start.
    arch=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')" 2>/dev/null)
    export PSS_KERNELS_CUDA_ARCHS=${PSS_KERNELS_CUDA_ARCHS:-${arch:-90}}
    echo "== install (CUDA archs $PSS_KERNELS_CUDA_ARCHS)"
    timeout -k 10 300 "$PY" -m pip install --no-build-isolation --no-deps -e . -v 2>&1 \
      | grep -E "pss_kernels:|Successfully|rror" | tail -20
    status=${PIPESTATUS[0]}
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
      --format=csv,noheader
    "$PY" -c "import torch, triton, pss_kernels as p; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'triton', triton.__version__); [print(f'  {k}: {v}') for k, v in p.available_backends().items()]"
    record install $(( status != 0 || $? != 0 ))
  fi

  if wants tests; then
    t_all=$(stage_seconds 190 180)
    workers=$("$PY" -c "import xdist" 2>/dev/null && echo "-n 8 --dist loadgroup" || echo "")
    per_test=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=150" || echo "")
    common=(-q -rfE -p no:cacheprovider --durations=15 $workers $per_test)
    if [ "$rehearse" = 1 ]; then
      gpu_selection=(-m cuda) rest_selection=(-m "not cuda" -k "kept_count or bad_input or accumulator_choice")
    else
      gpu_selection=(-m cuda) rest_selection=(-m "not cuda")
    fi
    t_gpu=$(( t_all * 3 / 5 ))
    echo "== tests: the cuda-marked tests (${t_gpu} s at most) ${workers:+with $workers}"
    timeout -k 20 -s INT "$t_gpu" "$PY" -m pytest "${common[@]}" "${gpu_selection[@]}" \
      --junitxml="$scratch/tests_cuda.xml" tests
    s_gpu=$?
    t_rest=$(stage_seconds $(( t_all - t_gpu + 30 )) 180)
    echo "== tests: every other test (${t_rest} s at most)"
    timeout -k 20 -s INT "$t_rest" "$PY" -m pytest "${common[@]}" "${rest_selection[@]}" \
      --junitxml="$scratch/tests_rest.xml" tests
    s_rest=$?
    "$PY" benchmarks/_test_summary.py "$out/tests.json" "cuda=$scratch/tests_cuda.xml:$s_gpu" \
      "rest=$scratch/tests_rest.xml:$s_rest"
    # pytest exits 5 when every selected test was deselected or skipped: not a failure here.
    record tests $(( (s_gpu != 0 && s_gpu != 5) || (s_rest != 0 && s_rest != 5) ))
  fi

  if wants ops; then
    t=$(stage_seconds 80 110)
    echo "== benchmarks/ops.py (${t} s)"
    if [ "$rehearse" = 1 ]; then
      "$PY" benchmarks/ops.py --device cpu --warmup 0 --iters 1 --out-dir "$out" --time-budget "$t"
    else
      "$PY" benchmarks/ops.py --out-dir "$out" --time-budget "$t"
    fi
    record ops $?
  fi

  if wants iter_time; then
    t=$(stage_seconds 110 40)
    echo "== benchmarks/iter_time.py (${t} s)"
    if [ "$rehearse" = 1 ]; then
      "$PY" benchmarks/iter_time.py --smoke --out-dir "$out" --time-budget "$t" --epochs 1
    else
      "$PY" benchmarks/iter_time.py --out-dir "$out" --time-budget "$t"
    fi
    record iter_time $?
  fi

  if wants sanitizer; then
    t=$(stage_seconds 50 0)
    if [ "$rehearse" = 1 ] || ! command -v compute-sanitizer > /dev/null; then
      echo "== sanitizer: compute-sanitizer is not on this machine; the script alone (${t} s)"
      timeout -k 10 "$t" "$PY" benchmarks/sanitize_kernels.py
      record sanitizer $?
    else
      for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool ($(( t / 2 )) s)"
        PYTORCH_NO_CUDA_MEMORY_CACHING=1 timeout -k 10 $(( t / 2 )) compute-sanitizer --tool "$tool" \
          --error-exitcode 3 --print-limit 20 "$PY" benchmarks/sanitize_kernels.py 2>&1 | tail -40
        record "sanitizer $tool" "${PIPESTATUS[0]}"
      done
    fi
  fi

  if wants tune; then
    t=$((deadline - SECONDS))
    if [ "$t" -lt 30 ]; then
      echo "== tune: skipped, ${t} s of the budget left"
    else
      echo "== benchmarks/tune_rpb_tiles.py (${t} s)"
      if [ "$rehearse" = 1 ]; then
        "$PY" benchmarks/tune_rpb_tiles.py --out-dir "$out" --time-budget "$t"
      else
        "$PY" benchmarks/tune_rpb_tiles.py --tokens 39 197 --out-dir "$out" --time-budget "$t"
      fi
      record tune $?
    fi
  fi

  files=$(find "$out" -maxdepth 1 -type f | wc -l)
  echo "== done: ${#failed[@]} stage(s) failed${failed:+: ${failed[*]}}; $files files in $out:"
  ls -1 "$out"
  [ "$files" -le 8 ] || echo "WARNING: more than 8 files in $out: the device tool returns 8 at most"
  [ ${#failed[@]} -eq 0 ]
} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
[ "$rehearse" = 1 ] && exit "$status"
exit 0
