#!/usr/bin/env bash
# The whole GPU window in ONE device call (a lent GPU gives 15 minutes of device time in all, one
# command at most 10, 1-2 of them spent starting the machine): the stages in priority order, each
# under a hard time limit inside one budget, every benchmark writing its JSON as rows complete, the
# output in at most 8 files.
#
#   bash benchmarks/gpu_session.sh                      # on the GPU machine: every stage
#   bash benchmarks/gpu_session.sh --rehearse           # here / in CI: every stage on CPU, smoke shapes
#   bash benchmarks/gpu_session.sh ops iter_time        # named stages only, in the order below
#   bash benchmarks/gpu_session.sh ops --ops "--impls pss,pss-frozen-table,pss-dbias-csr --keep-rates 0.6"
#
# Stages, in this order (the seconds are each stage's cap within BUDGET_S):
#   install     build pss_kernels._C for this GPU (editable install, no build isolation, no
#               dependencies; PYTHONPATH=. if that fails); versions and available_backends()    60
#   cuda        the `cuda`-marked tests (the kernels' GPU checks), 4 xdist workers              100
#   ops         benchmarks/ops.py: rpb_attention at the target cases (pss and sdpa-flash first, then
#               the frozen table, the sdpa backend, sdpa-bias, the eager peers and every bias-gradient
#               accumulator), flex under its own timeout, sample_patches' target shape, the rest  120
#   iter_time   benchmarks/iter_time.py, the main job: its target cases first (vit_base)          80
#   varlen      benchmarks/varlen.py: packed attention (rpb_attention_varlen's fused kernel) against
#               the dense kernel at the same total tokens (the packing target: the pair timed
#               interleaved, and from CUDA graphs), the allocation policies, FlashAttention varlen,
#               the packed sampler against the dense one, FlexAttention with a document mask last
#               (its compilation under its own limit, skipped when too little is left) (JSON only) 100
#   data        benchmarks/data.py: the loader per decoder (CPU auto, nvjpeg, nvimgcodec: the GPU
#               decoders installed from wheels/*.whl when carried, the machine has no network) and
#               worker count against vit_base's training images/s at rho 1, 0.5, 0.2 (JSON only)  60
#   tests       the GPU-relevant tests that are not `cuda`-marked (kernels, peers, models, token
#               pruning; CI runs every other test on CPU); those that give the kernels bad offsets
#               unchecked first, in a pytest of their own (a fault stays there)                   50
#   sanitizer   compute-sanitizer memcheck on benchmarks/sanitize_kernels.py, this package's
#               kernels only (--kernel-regex), small shapes                                        40
#   tune        benchmarks/tune_rpb_tiles.py at n = 39 and 197, with what is left
#
# Options: --rehearse; --ops ARGS, --iter-time ARGS, --varlen ARGS, --tune ARGS (extra arguments for that benchmark,
# e.g. to measure only what changed since the last window); --tests ARGS (extra pytest arguments for
# both test stages, e.g. "-k csr"). BUDGET_S (default 480 on a GPU) bounds the whole; each stage gets
# min(its cap, what is left after keeping the later stages' minimums) and runs under `timeout`, so
# one overrun cannot eat the stages after it. A target that was not measured is reported as NOT
# MEASURED, never as a miss.
#
# Output in $OUT (the device tool's output folder; without it benchmarks/results, or with --rehearse
# runs/gpu_session_rehearsal): session.log, tests.json, ops_*.json, iter_time_*.json/png, varlen_*.json,
# data_*.json, rpb_tiles_*.json: 8 files (the device tool returns 8 at most; keep_window.py draws the
# ops and varlen plots from their JSON). Keep them with
# `python benchmarks/keep_window.py <the folder they came back to>` (benchmarks/results/<device>_<date>/).
#
# --rehearse runs the same stages, commands and files on a machine without a GPU: the package is
# installed the same way, the cuda stage runs the `cuda` tests (they skip) and the tests stage a small
# CPU selection, the benchmarks their smoke configurations, the sanitizer stage the script without
# compute-sanitizer, the tile sweep the Triton interpreter (where it can run). Exit status 1 if a
# stage failed (CI runs the rehearsal, so a broken script is found there, not on the GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STAGES=(install cuda ops iter_time varlen data tests sanitizer tune)
declare -A CAP=([install]=60 [cuda]=100 [ops]=120 [iter_time]=80 [varlen]=100 [data]=60 [tests]=50 [sanitizer]=40
                [tune]=30)
declare -A FLOOR=([install]=30 [cuda]=40 [ops]=60 [iter_time]=40 [varlen]=20 [data]=0 [tests]=20 [sanitizer]=20
                  [tune]=0)
# The GPU image's interpreter is `python3` (a venv holding torch); `python` may not exist there.
PY=${PYTHON:-$(command -v python3 || command -v python)}
rehearse=0
stages=()
ops_args="" iter_args="" varlen_args="" tune_args="" test_args=""
while [ $# -gt 0 ]; do
  case "$1" in
    --rehearse) rehearse=1 ;;
    --ops) ops_args=${2-}; shift ;;
    --iter-time) iter_args=${2-}; shift ;;
    --varlen) varlen_args=${2-}; shift ;;
    --tune) tune_args=${2-}; shift ;;
    --tests) test_args=${2-}; shift ;;
    -h|--help) sed -n '2,49p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) if [[ " ${ALL_STAGES[*]} " == *" $1 "* ]]; then stages+=("$1"); else
         echo "gpu_session.sh: unknown argument '$1' (stages: ${ALL_STAGES[*]}; options: --rehearse, --ops ARGS," \
              "--iter-time ARGS, --varlen ARGS, --tune ARGS, --tests ARGS)" >&2; exit 2; fi ;;
  esac
  shift
done
[ ${#stages[@]} -gt 0 ] || stages=("${ALL_STAGES[@]}")
wants() { [[ " ${stages[*]} " == *" $1 "* ]]; }

if [ "$rehearse" = 1 ]; then
  out=${OUT:-runs/gpu_session_rehearsal}
  budget=${BUDGET_S:-2400}
  cap_scale=6  # a shared 2-core CPU, the interpreter: the rehearsal checks that the stages run, not the budget
else
  out=${OUT:-benchmarks/results}
  budget=${BUDGET_S:-480}
  cap_scale=1
fi
mkdir -p "$out"
log="$out/session.log"
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
deadline=$((SECONDS + budget))
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1 PIP_DISABLE_PIP_VERSION_CHECK=1
[ "$rehearse" = 1 ] && export TRITON_INTERPRET=1

# Seconds for a stage: min(its cap, what is left after the floors of the later wanted stages), >= 10.
stage_seconds() {
  local stage=$1 reserve=0 later=0 s
  for s in "${ALL_STAGES[@]}"; do
    if [ "$s" = "$stage" ]; then later=1; elif [ "$later" = 1 ] && wants "$s"; then
      reserve=$((reserve + FLOOR[$s] * cap_scale)); fi
  done
  local cap=$((CAP[$stage] * cap_scale)) left=$((deadline - SECONDS - reserve))
  [ "$stage" = tune ] && cap=$((deadline - SECONDS))  # the last stage takes what is left
  local t=$(( left < cap ? left : cap ))
  echo $(( t > 10 ? t : 10 ))
}
# A benchmark's own --time-budget: its stage's limit less a margin to write its files.
inner_budget() { echo $(( $1 > 45 ? $1 - 15 : $1 * 2 / 3 )); }
# run_limited <seconds> <command...>: the command under a hard limit (SIGTERM, SIGKILL 10 s later);
# its exit status (124: cut by the limit).
run_limited() { local t=$1; shift; timeout -k 10 "$t" "$@"; }
# pytest under its limit gets SIGINT, not SIGTERM: it ends the session as on Ctrl-C and still writes its
# --junitxml (SIGTERM loses every result of the stage); exit status 124 all the same.
run_pytest_limited() { local t=$1; shift; timeout -s INT -k 15 "$t" "$@"; }
failed=()
record() {  # record <stage> <exit status>
  local note=""
  [ "$2" -eq 124 ] || [ "$2" -eq 137 ] && note=" (cut by its time limit)"
  [ "$2" -ne 0 ] && failed+=("$1 (exit status $2$note)")
  echo "== $1 finished with exit status $2$note, $((deadline - SECONDS)) s of the budget left"
}

{
  echo "== gpu_session.sh $([ "$rehearse" = 1 ] && echo '--rehearse ')stages: ${stages[*]}; budget ${budget} s; output in $out"
  echo "== $(date -u +%FT%TZ) on $(hostname), $(nproc) cores"

  if wants install; then
    t=$(stage_seconds install)
    # _C for this GPU's architecture only: a fresh machine compiles it on every start.
    arch=$("$PY" -c "import torch; p = torch.cuda.get_device_capability(); print(f'{p[0]}{p[1]}')" 2>/dev/null)
    export PSS_KERNELS_CUDA_ARCHS=${PSS_KERNELS_CUDA_ARCHS:-${arch:-90}}
    echo "== install (CUDA archs $PSS_KERNELS_CUDA_ARCHS, $t s at most)"
    install_start=$SECONDS
    run_limited "$t" "$PY" -m pip install --no-build-isolation --no-deps -e . -v > "$scratch/install.log" 2>&1
    status=$?
    grep -E "pss_kernels:|Successfully|rror" "$scratch/install.log" | tail -20
    if [ "$status" -ne 0 ] || ! "$PY" -c "import pss_kernels" 2>/dev/null; then
      echo "== install failed (exit status $status): the tree on PYTHONPATH instead; the tail of pip's log:"
      tail -30 "$scratch/install.log"
      export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
      # pip can fail before it builds anything (e.g. a setuptools without bdist_wheel): build _C into
      # the tree itself, so the cuda backend is still there for the stages below.
      left=$(( t - (SECONDS - install_start) ))
      if [ "$left" -gt 10 ]; then
        echo "== building pss_kernels._C in the tree (setup.py build_ext --inplace, $left s at most)"
        run_limited "$left" "$PY" setup.py -q build_ext --inplace > "$scratch/build_ext.log" 2>&1
        echo "   build_ext exit status $?"; grep -E "pss_kernels:|rror" "$scratch/build_ext.log" | tail -10
      fi
    fi
    command -v nvidia-smi > /dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm \
      --format=csv,noheader
    "$PY" -c "import torch, triton, numpy, pss_kernels as p; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'triton', triton.__version__, 'numpy', numpy.__version__); [print(f'  {k}: {v}') for k, v in p.available_backends().items()]"
    record install $(( status != 0 || $? != 0 ))
  fi

  # pytest: 4 xdist workers with 4 torch threads each on the GPU machine's 16 cores (Triton compiles
  # in parallel across workers); one process when xdist is missing.
  workers=$("$PY" -c "import xdist" 2>/dev/null && [ "$rehearse" = 0 ] && echo "-n 4 --dist loadgroup" || echo "")
  per_test=$("$PY" -c "import pytest_timeout" 2>/dev/null && echo "--timeout=120" || echo "")
  pytest_common=(-q -rfE -p no:cacheprovider --durations=10 $workers $per_test $test_args)
  gpu_files=(tests/test_rpb_attention.py tests/test_sample_patches.py tests/test_rpb_peers.py tests/test_models.py
             tests/test_token_pruning.py tests/test_varlen.py)
  summaries=()

  if wants cuda; then
    t=$(stage_seconds cuda)
    echo "== cuda: the cuda-marked tests ($t s at most) ${workers:+with $workers}"
    OMP_NUM_THREADS=4 run_pytest_limited "$t" "$PY" -m pytest "${pytest_common[@]}" -m cuda \
      --junitxml="$scratch/tests_cuda.xml" tests
    s=$?
    summaries+=("cuda=$scratch/tests_cuda.xml:$s")
    record cuda $(( s != 0 && s != 5 ? s : 0 ))  # 5: every selected test was skipped (no GPU)
  fi

  if wants ops; then
    t=$(stage_seconds ops)
    echo "== benchmarks/ops.py (${t} s at most) $ops_args"
    if [ "$rehearse" = 1 ]; then
      run_limited "$t" "$PY" benchmarks/ops.py --device cpu --warmup 0 --iters 1 --out-dir "$out" --no-plot \
        --time-budget "$(inner_budget "$t")" $ops_args
    else
      run_limited "$t" "$PY" benchmarks/ops.py --warmup 5 --iters 20 --out-dir "$out" --time-budget "$(inner_budget "$t")" \
        --flex-timeout 60 --no-plot $ops_args
    fi
    record ops $?
  fi

  if wants iter_time; then
    t=$(stage_seconds iter_time)
    echo "== benchmarks/iter_time.py (${t} s at most) $iter_args"
    if [ "$rehearse" = 1 ]; then
      run_limited "$t" "$PY" benchmarks/iter_time.py --smoke --out-dir "$out" --time-budget "$(inner_budget "$t")" --epochs 1 \
        $iter_args
    else
      run_limited "$t" "$PY" benchmarks/iter_time.py --out-dir "$out" --time-budget "$(inner_budget "$t")" --models vit_base \
        --impls pss,pss-default,published,eager-index,sdpa-bias,pss-budget --warmup 5 --iters 20 --rounds 4 $iter_args
    fi
    record iter_time $?
  fi

  if wants varlen; then
    t=$(stage_seconds varlen)
    echo "== benchmarks/varlen.py (${t} s at most) $varlen_args"
    if [ "$rehearse" = 1 ]; then
      run_limited "$t" "$PY" benchmarks/varlen.py --device cpu --keep-rates 0.5 --warmup 0 --iters 1 --out-dir "$out" \
        --time-budget "$(inner_budget "$t")" $varlen_args
    else
      run_limited "$t" "$PY" benchmarks/varlen.py --warmup 5 --iters 20 --out-dir "$out" \
        --time-budget "$(inner_budget "$t")" $varlen_args
    fi
    record varlen $?
  fi

  if wants data; then
    t=$(stage_seconds data)
    echo "== benchmarks/data.py (${t} s at most)"
    if [ "$rehearse" = 1 ]; then
      run_limited "$t" "$PY" benchmarks/data.py --images 16 --batch-size 4 --batches 2 --workers 0 --img-size 32 \
        --model deit_tiny --keep-rates 1.0 0.2 --decoders auto nvjpeg --device cpu --no-plot --out-dir "$out"
    else
      # nvImageCodec travels as a wheel (the GPU machine has no network); torchvision brings nvJPEG.
      for wheel in wheels/*.whl; do [ -e "$wheel" ] && "$PY" -m pip install -q --no-deps "$wheel"; done
      run_limited "$t" "$PY" benchmarks/data.py --decoders auto nvjpeg nvimgcodec --workers 8 16 --batch-size 128 \
        --batches 40 --model vit_base --keep-rates 1.0 0.5 0.2 --no-plot --out-dir "$out"
    fi
    record data $?
  fi

  if wants tests; then
    t=$(stage_seconds tests)
    # The tests that hand the kernels bad offsets unchecked run first, in a process of their own: the
    # kernels clamp them (only a GPU can prove it), and a fault would end the CUDA context of the xdist
    # worker that met it, failing every later test on that worker with it.
    # (Selected by node id, not -k: a user's --tests "-k ..." still applies to both runs.)
    isolated=tests/test_varlen.py::test_varlen_triton_attention_stays_in_bounds_on_unchecked_bad_offsets
    t_isolated=$(( t / 4 > 15 ? t / 4 : 15 ))
    t_isolated=$(( t_isolated > t / 2 ? t / 2 : t_isolated ))  # the rest keeps half the stage at least
    if [ "$rehearse" = 1 ]; then
      selection=(-m "not cuda" -k "kept_count or bad_input or accumulator_choice or sdpa_table_scatter")
      isolated_run=("$isolated[False]")  # one of the two (the interpreter is slow)
    else
      selection=(-m "not cuda" --deselect "$isolated")
      isolated_run=("$isolated")
    fi
    echo "== tests: the GPU-relevant tests that are not cuda-marked ($t s at most; $t_isolated s of them for" \
      "the unchecked-offset tests, alone)"
    OMP_NUM_THREADS=4 run_pytest_limited "$t_isolated" "$PY" -m pytest -q -rfE -p no:cacheprovider $per_test \
      $test_args --junitxml="$scratch/tests_isolated.xml" "${isolated_run[@]}"
    s_isolated=$?
    summaries+=("isolated=$scratch/tests_isolated.xml:$s_isolated")
    OMP_NUM_THREADS=4 run_pytest_limited "$(( t - t_isolated ))" "$PY" -m pytest "${pytest_common[@]}" \
      "${selection[@]}" --junitxml="$scratch/tests_rest.xml" "${gpu_files[@]}"
    s=$?
    summaries+=("rest=$scratch/tests_rest.xml:$s")
    s=$(( s != 0 && s != 5 ? s : 0 )) s_isolated=$(( s_isolated != 0 && s_isolated != 5 ? s_isolated : 0 ))
    record tests $(( s != 0 ? s : s_isolated ))
  fi
  if [ ${#summaries[@]} -gt 0 ]; then
    "$PY" benchmarks/_test_summary.py "$out/tests.json" "${summaries[@]}"
  fi

  if wants sanitizer; then
    t=$(stage_seconds sanitizer)
    # The venv's torch comes from PyPI: the toolkit's bin may not be on PATH.
    sanitizer=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null)
    if [ "$rehearse" = 1 ] || [ -z "$sanitizer" ]; then
      echo "== sanitizer: compute-sanitizer is not on this machine; the script alone ($t s at most)"
      run_limited "$t" "$PY" benchmarks/sanitize_kernels.py
      record sanitizer $?
    else
      # Only kernels whose name holds "_kernel" are instrumented, where this compute-sanitizer has the
      # filter: every kernel of this package (Triton and CUDA C++), and many of torch's too (a substring
      # match), which only costs time.
      filter=()
      "$sanitizer" --help 2>/dev/null | grep -q -- "--kernel-name" && filter=(--kernel-name kns=_kernel)
      echo "== $sanitizer --tool memcheck ${filter[*]} ($t s at most)"
      # The sanitizer's own lines (its reports, at most 20, and summary) and the script's failures, not its ok lines,
      # so that an early report is not scrolled away.
      PYTORCH_NO_CUDA_MEMORY_CACHING=1 run_limited "$t" "$sanitizer" --tool memcheck --error-exitcode 3 \
        --print-limit 20 "${filter[@]}" "$PY" benchmarks/sanitize_kernels.py 2>&1 | \
        grep -vE "^ok " | tail -120
      record sanitizer "${PIPESTATUS[0]}"
    fi
  fi

  if wants tune; then
    t=$(stage_seconds tune)
    if [ "$t" -lt 25 ]; then
      echo "== tune: skipped, $((deadline - SECONDS)) s of the budget left"
    else
      echo "== benchmarks/tune_rpb_tiles.py ($t s at most) $tune_args"
      if [ "$rehearse" = 1 ]; then
        run_limited "$t" "$PY" benchmarks/tune_rpb_tiles.py --out-dir "$out" --time-budget "$(inner_budget "$t")" $tune_args
      else
        run_limited "$t" "$PY" benchmarks/tune_rpb_tiles.py --tokens 39 197 --out-dir "$out" \
          --time-budget "$(inner_budget "$t")" $tune_args
      fi
      record tune $?
    fi
  fi

  rm -f "$out"/*.partial
  files=$(find "$out" -maxdepth 1 -type f | wc -l)
  echo "== done: ${#failed[@]} stage(s) failed${failed:+: ${failed[*]}}; $files files in $out:"
  ls -1 "$out"
  [ "$files" -le 8 ] || echo "WARNING: more than 8 files in $out: the device tool returns 8 at most"
  [ ${#failed[@]} -eq 0 ]
} 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
[ "$rehearse" = 1 ] && exit "$status"
exit 0
