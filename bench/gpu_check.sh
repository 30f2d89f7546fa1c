#!/usr/bin/env bash
# bench/gpu_check.sh: the one prepared check for a machine with an NVIDIA GPU and no network
# (torch, triton and the test tools already installed there). Run from the repository root:
#
#     [OUT=dir] [GIT_SHA=sha] [PYTHON=python3] bash bench/gpu_check.sh [--dry-run]
#
# Steps, each under `timeout`; every step runs even after an earlier one failed:
#   gpu           nvidia-smi; torch sees a CUDA device
#   build         pip install --no-build-isolation --no-deps -e . building resfused._C for the local
#                 GPU (TORCH_CUDA_ARCH_LIST from torch) with MAX_JOBS=$(nproc), RESFUSED_FORCE_CUDA_BUILD=1
#   info          python -m resfused; the cuda and triton backends must both be available
#   tests         pytest tests (all of them; the cuda-marked ones run on a GPU)
#   memcheck      compute-sanitizer --tool memcheck on bench/sanitize_case.py (caching allocator off)
#   racecheck     compute-sanitizer --tool racecheck on bench/sanitize_case.py
#   bench         python bench/run.py --quick -> JSON: BN kernels (1 op, 2 shapes, bf16 + fp32), ResNet-50
#                 bf16 model rows (train: eager, resfused; infer: eager, resfused, fuse_for_inference on the
#                 cuda and triton backends, torch.compile with freezing in mode=default), fused-conv kernels
#                 (3 ResNet-50 convs, bf16: eager, cudnn-fused, compile, resfused-cuda, resfused-triton)
#   report        python bench/report.py on that JSON -> markdown + 3 PNGs
#   pytest-bench  pytest bench --benchmark-only on one small case (the pytest-benchmark entry works)
# Output, in $OUT if set, else bench/results/ (few files, for tools that fetch at most 8):
#   <stamp>-gpu-check.log (every step's output), <stamp>-gpu-quick.json, .md, -speedup.png, -copy-bw.png,
#   -conv-speedup.png
# The step table is printed last. Exit status: 0 when every step passed, 1 otherwise, 2 for bad usage.
#
# --dry-run (any machine, seconds): runs no step; checks that each step's tools and files exist
# (pip, nvcc, pytest, compute-sanitizer, bench/sanitize_case.py, ...) and prints the same table;
# exit 1 when a step could not run here.
#
# Time: the whole check must fit in 8 minutes on an H100. GPU_CHECK_BUDGET_S (default 470) bounds
# all steps together; a step gets min(its cap, what is left); caps: GPU_CHECK_CAP_<STEP>_S
# (e.g. GPU_CHECK_CAP_TESTS_S=200). A step that finds no time left is reported SKIPPED (a failure).
# Other knobs: SANITIZE_CASE (default bench/sanitize_case.py), GPU_CHECK_TEST_WORKERS (pytest-xdist
# workers, default 4; 0 = no xdist), GPU_CHECK_PYTEST_ARGS (extra pytest arguments), GPU_CHECK_STEPS
# (comma-separated steps to run, default all; the others are listed as "-").

set -u -o pipefail

DRY=0
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,/^$/p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $arg (use --dry-run or --help)" >&2; exit 2 ;;
  esac
done

cd "$(dirname "$0")/.." || exit 2
ROOT="$(pwd)"
OUT_DIR="${OUT:-bench/results}"
mkdir -p "$OUT_DIR" || exit 2
OUT_DIR="$(cd "$OUT_DIR" && pwd)"
STAMP="$(date -u +%Y%m%dT%H%M%SZ)"
LOG="$OUT_DIR/$STAMP-gpu-check$([ "$DRY" = 1 ] && echo -dry-run).log"
JSON="$OUT_DIR/$STAMP-gpu-quick.json"
PY="${PYTHON:-$(command -v python3 || command -v python || echo python3)}"
SANITIZE_CASE="${SANITIZE_CASE:-bench/sanitize_case.py}"
BUDGET="${GPU_CHECK_BUDGET_S:-470}"
WORKERS="${GPU_CHECK_TEST_WORKERS:-4}"
if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then export CUDA_HOME=/usr/local/cuda; fi
SANITIZER="$(command -v compute-sanitizer || echo "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer")"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1 PYTHONUNBUFFERED=1
START=$SECONDS

NAMES=(); STATES=(); TIMES=(); NOTES=()
record() {  # record NAME STATUS SECONDS NOTE
  NAMES+=("$1"); STATES+=("$2"); TIMES+=("$3"); NOTES+=("$4")
  printf '=== [%s] %s in %ss%s\n' "$1" "$2" "$3" "${4:+: $4}" | tee -a "$LOG"
}

cap() {  # cap STEP DEFAULT -> GPU_CHECK_CAP_<STEP>_S or DEFAULT
  local var="GPU_CHECK_CAP_$(echo "$1" | tr 'a-z-' 'A-Z_')_S"
  echo "${!var:-$2}"
}

STEPS="${GPU_CHECK_STEPS:-gpu,build,info,tests,memcheck,racecheck,bench,report,pytest-bench}"
selected() {  # selected NAME: in GPU_CHECK_STEPS? Otherwise listed as "-" (not a failure)
  case ",$STEPS," in *",$1,"*) return 0 ;; esac
  NAMES+=("$1"); STATES+=("-"); TIMES+=(0); NOTES+=("not in GPU_CHECK_STEPS"); return 1
}

run_step() {  # run_step NAME CAP_S RESERVE_S CMD...   (RESERVE_S: seconds kept for the steps after it)
  local name=$1 capped reserve=$3 left t0 rc status note=""
  selected "$name" || return 0
  capped=$(cap "$name" "$2"); shift 3
  left=$(( BUDGET - (SECONDS - START) - reserve ))
  local limit=$(( capped < left ? capped : left ))
  if (( limit < 10 )); then
    echo "=== [$name] not started: ${left}s of the ${BUDGET}s budget left" | tee -a "$LOG"
    record "$name" "SKIPPED" 0 "no time left in the ${BUDGET}s budget"
    return
  fi
  printf '\n=== [%s] %s (timeout %ss): %s\n' "$name" "$(date -u +%H:%M:%S)" "$limit" "$*" | tee -a "$LOG"
  t0=$SECONDS
  local log_start
  log_start=$(wc -c <"$LOG")
  timeout --kill-after=15 "$limit" "$@" >>"$LOG" 2>&1 </dev/null
  rc=$?
  case $rc in
    0) status=PASS ;;
    124|137) status=TIMEOUT; note="killed after ${limit}s" ;;
    86) status=FAIL; note="compute-sanitizer reported errors (see the log)" ;;
    *) status=FAIL; note="exit status $rc" ;;
  esac
  if [ "$status" != PASS ]; then tail -c +$(( log_start + 1 )) "$LOG" | tail -n 25 | sed 's/^/    | /'; fi
  record "$name" "$status" $(( SECONDS - t0 )) "$note"
}

check_step() {  # dry run: check_step NAME "what it would run" CHECK-COMMAND...
  local name=$1 what=$2 out rc; shift 2
  selected "$name" || return 0
  printf '\n=== [%s] would run: %s\n' "$name" "$what" >>"$LOG"
  out=$("$@" 2>&1); rc=$?
  printf '%s\n' "$out" >>"$LOG"
  if [ $rc = 0 ]; then record "$name" "READY" 0 "$out"; else record "$name" "MISSING" 0 "$out"; fi
}

has_module() { "$PY" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

MISSING=()
need() {  # need DESCRIPTION TEST...: remember DESCRIPTION when TEST fails
  local desc=$1; shift
  "$@" >/dev/null 2>&1 || MISSING+=("$desc")
}
verdict() {  # verdict [NOTE]: after need calls, say what is missing (fail) or "ok NOTE"
  if [ ${#MISSING[@]} -gt 0 ]; then printf 'missing: %s\n' "$(IFS=';'; echo "${MISSING[*]}" | sed 's/;/; /g')"; MISSING=(); return 1; fi
  echo "ok${1:+ ($1)}"
}

# --- the checks behind --dry-run (one function per step) ----------------------------------------
dry_gpu()      { need "nvidia-smi (NVIDIA driver)" command -v nvidia-smi; need "torch for $PY" has_module torch; verdict; }
dry_build()    { need "pip for $PY" "$PY" -m pip --version; need "setuptools for $PY" has_module setuptools
                 need "nvcc at ${CUDA_HOME:-/usr/local/cuda}/bin/nvcc (set CUDA_HOME)" test -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
                 need "setup.py" test -f setup.py; verdict; }
dry_info()     { need "resfused/__main__.py" test -f resfused/__main__.py; verdict; }
dry_tests()    { need "pytest for $PY" has_module pytest; need "tests/" test -d tests
                 verdict "$(has_module xdist || echo 'pytest-xdist missing: tests run serially')"; }
dry_sanitize() { need "compute-sanitizer ($SANITIZER)" test -x "$SANITIZER"
                 need "$SANITIZE_CASE (the sanitizer case)" test -f "$SANITIZE_CASE"; verdict; }
dry_bench()    { need "bench/run.py --help to work" "$PY" bench/run.py --help; verdict; }
dry_report()   { need "bench/report.py --help to work" "$PY" bench/report.py --help
                 verdict "$(has_module matplotlib || echo 'matplotlib missing: markdown only')"; }
dry_pybench()  { need "pytest-benchmark for $PY" has_module pytest_benchmark; verdict; }

echo "gpu_check: $(date -u +%Y-%m-%dT%H:%M:%SZ), root $ROOT, python $PY, out $OUT_DIR, budget ${BUDGET}s$([ "$DRY" = 1 ] && echo ', DRY RUN')" | tee "$LOG"

ARCH=""
XDIST=()
if [ "$DRY" = 0 ]; then
  case ",$STEPS," in *,build,*)  # the local GPU's architecture, e.g. 9.0 on an H100
    ARCH=$("$PY" -c "import torch; m, n = torch.cuda.get_device_capability(); print(f'{m}.{n}')" 2>/dev/null) ;;
  esac
  if [ "$WORKERS" != 0 ] && has_module xdist; then XDIST=(-n "$WORKERS"); fi
fi
# shellcheck disable=SC2206
EXTRA_PYTEST=(${GPU_CHECK_PYTEST_ARGS:-})
PYTEST_BENCH_K="eval_fwd and 2048x7x7 and bf16 and not compile"

if [ "$DRY" = 1 ]; then
  check_step gpu          "nvidia-smi; torch.cuda.is_available()"                                     dry_gpu
  check_step build        "pip install --no-build-isolation --no-deps -e . (RESFUSED_FORCE_CUDA_BUILD=1)" dry_build
  check_step info         "$PY -m resfused"                                                            dry_info
  check_step tests        "$PY -m pytest tests"                                                         dry_tests
  check_step memcheck     "$SANITIZER --tool memcheck $PY $SANITIZE_CASE"                               dry_sanitize
  check_step racecheck    "$SANITIZER --tool racecheck $PY $SANITIZE_CASE"                              dry_sanitize
  check_step bench        "$PY bench/run.py --quick --no-report --json $JSON"                           dry_bench
  check_step report       "$PY bench/report.py $JSON"                                                   dry_report
  check_step pytest-bench "$PY -m pytest bench --benchmark-only --bench-quick -k '$PYTEST_BENCH_K'"     dry_pybench
else
  run_step gpu 30 0 bash -c "nvidia-smi && '$PY' -c 'import torch; assert torch.cuda.is_available(), \"torch sees no CUDA device\"; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())'"
  run_step build 200 0 env MAX_JOBS="${MAX_JOBS:-$(nproc)}" RESFUSED_FORCE_CUDA_BUILD=1 ${ARCH:+TORCH_CUDA_ARCH_LIST="$ARCH"} \
    "$PY" -m pip install --no-build-isolation --no-deps -e .
  run_step info 40 0 bash -c "'$PY' -m resfused && '$PY' -c 'import resfused, sys; b = resfused.available_backends(); print(\"available backends:\", b); sys.exit(0 if {\"cuda\", \"triton\"} <= set(b) else \"cuda and triton backends must both be available on a GPU\")'"
  # -v: one line per test as it ends, so a run cut short by the timeout still says what passed and what hung.
  run_step tests 150 0 "$PY" -m pytest tests -v -rfE -p no:cacheprovider --durations=15 ${XDIST[@]+"${XDIST[@]}"} \
    ${EXTRA_PYTEST[@]+"${EXTRA_PYTEST[@]}"}
  if [ -f "$SANITIZE_CASE" ] && [ -x "$SANITIZER" ]; then
    run_step memcheck 60 0 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 "$SANITIZER" --tool memcheck --error-exitcode 86 \
      --print-limit 100 "$PY" "$SANITIZE_CASE"
    run_step racecheck 60 0 "$SANITIZER" --tool racecheck --error-exitcode 86 --print-limit 100 "$PY" "$SANITIZE_CASE"
  else
    for s in memcheck racecheck; do
      selected "$s" && record "$s" "FAIL" 0 "$( [ -x "$SANITIZER" ] || printf 'no compute-sanitizer at %s; ' "$SANITIZER")$( [ -f "$SANITIZE_CASE" ] || printf '%s not found' "$SANITIZE_CASE")"
    done
  fi
  run_step bench 240 25 "$PY" bench/run.py --quick --no-report --no-progress --json "$JSON"
  if [ -f "$JSON" ]; then
    run_step report 30 0 "$PY" bench/report.py "$JSON"
  elif selected report; then
    record report "FAIL" 0 "no JSON from the bench step"
  fi
  run_step pytest-bench 60 0 "$PY" -m pytest bench -q -p no:cacheprovider --benchmark-only --bench-quick \
    -k "$PYTEST_BENCH_K"
fi

# The fetching tool takes files up to 16 MiB: keep the log's head and tail if it grew past that.
if [ "$(wc -c <"$LOG")" -gt $((15 * 1024 * 1024)) ]; then
  { head -c $((7 * 1024 * 1024)) "$LOG"; printf '\n... [log truncated by gpu_check.sh] ...\n'; tail -c $((7 * 1024 * 1024)) "$LOG"; } >"$LOG.tmp" \
    && mv "$LOG.tmp" "$LOG"
fi

FAILED=()
for i in "${!NAMES[@]}"; do
  case "${STATES[$i]}" in PASS|READY|-) ;; *) FAILED+=("${NAMES[$i]}") ;; esac
done
DEVICE=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
{
  echo
  echo "================================ gpu_check summary ================================"
  echo "device: ${DEVICE:-no NVIDIA GPU visible}; total $(( SECONDS - START ))s (budget ${BUDGET}s)$([ "$DRY" = 1 ] && echo '; DRY RUN: nothing was run')"
  printf '%-13s %-8s %7s  %s\n' step status seconds note
  for i in "${!NAMES[@]}"; do
    printf '%-13s %-8s %7s  %s\n' "${NAMES[$i]}" "${STATES[$i]}" "${TIMES[$i]}" "$(printf '%s' "${NOTES[$i]}" | tr '\n' ' ' | cut -c1-160)"
  done
  echo "files in $OUT_DIR:"
  ls -1 "$OUT_DIR" 2>/dev/null | grep -F "$STAMP" | sed 's/^/  /'
  if [ ${#FAILED[@]} = 0 ]; then
    echo "result: $([ "$DRY" = 1 ] && echo 'READY (every step can run)' || echo PASS)"
  else
    echo "result: FAIL (${FAILED[*]})"
  fi
} | tee -a "$LOG"
[ ${#FAILED[@]} = 0 ]
