#!/usr/bin/env bash
# bench/gpu_check.sh — everything moe-engine can check only on a GPU, in one run of under 8 minutes (issue 19).
#
# HOW TO RUN
#   On a machine with one NVIDIA GPU, from anywhere:
#       bash bench/gpu_check.sh [MODEL_DIR]
#   Through the session's device tool (it runs a command in the repo root of a copy of the working tree on the
#   GPU machine and brings back what is written under $OUT; the machine has no network, and its python3 holds
#   torch + triton + nvcc):
#       run(command="bash bench/gpu_check.sh", timeout_s=540)
#   (the repo's ignored *.so and build/ do not travel, so _C is compiled there for that machine's python3)
#   then read $OUT/gpu_check.md (the table) and $OUT/gpu_check.log (each step's output, tails). Give the machine
#   back afterwards unless you rerun at once.
#   Output: ONE markdown table on stdout and in $OUT/gpu_check.md when $OUT is a folder, in $OUT when it names a
#   file, else ./gpu_check.md; the logs beside it (gpu_check.log). Exit code 0 whatever failed: read the table.
#
#   MODEL_DIR (or GPU_CHECK_MODEL): the checkpoint of the decode rows. Without one a ~430 MB Mixtral-shaped
#   bf16 checkpoint (4 layers x 16 experts of 6 MiB, top-2, hidden 1024) is made with bench/make_checkpoint.py
#   under ${GPU_CHECK_CKPT:-$TMPDIR/moe-gpu-check-ckpt} (reused when complete), in the background; if that fails
#   the bundled tiny model (moe_engine/models/tiny-moe) is the fallback.
#   Other switches: PYTHON (default python3); GPU_CHECK_FORCE=1 runs the GPU steps even when torch sees no GPU
#   (a developer's dry run: they then skip or fail inside; it rebuilds _C in place, so use a copy of the tree);
#   GPU_CHECK_TOTAL_S (default 470) caps the whole run;
#   T_BUILD, T_TESTS_TRITON, T_TESTS_OTHER, T_H2D, T_QBENCH, T_CKPT, T_DECODE override the step budgets below.
#
# STEPS, their budgets (seconds, each under `timeout`, so a hung step is killed and the next runs) and ROWS
#   probe             20   "GPU": the device torch sees (name, memory, SMs), torch/CUDA/python versions, nvidia-smi.
#                          No device: the row says so and every GPU row below reads `skip`.
#   toolkit            5   "CUDA toolkit (nvcc)": nvcc's release, or `absent` — then setup.py builds moe_engine._C
#                          WITHOUT its CUDA parts, the "build" row says so, and the rest still runs (the h2d row
#                          then measures the torch fallback of copy_h2d_async).
#   triton            25   "triton": its version; if it does not import, `pip install triton` is tried (from a
#                          carried .whl/ folder with --no-index when there is one; the GPU machine has no network).
#   build            100   "build moe_engine._C": `python setup.py build_ext --inplace` (what `pip install -e .`
#                          compiles; pip itself is not used: no registry on the GPU machine), then whether _C
#                          imports and whether it has its CUDA parts (_C.has_cuda()).
#   tests: Triton    200   "CUDA tests: ..." rows: every CUDA test, by pytest -v. The suite has no `cuda` marker:
#   tests: other      60   CUDA tests are gated by skipif(not torch.cuda.is_available(), reason="needs a CUDA
#                          device") or skipif(not HAS_CUDA_OPS, reason="no CUDA ops in _C"), and three of them
#                          have no "cuda" in their names, so `-k cuda` would miss them. bench/gpu_check.py, loaded
#                          with `-p gpu_check`, keeps the tests whose skipif reason names CUDA, that carry a
#                          cuda/gpu marker, or whose names contain "cuda", over the test files that mention cuda;
#                          tests/, conftest.py and pyproject.toml stay untouched. The Triton file's tests
#                          (tests/test_quant_triton.py: a grid of ~200 kernel compiles) need no _C, so they start
#                          at once in the background with MOE_ENGINE_NO_EXT=1, overlapping the build; the others
#                          (tests/test_ops.py: pinned buffers, copy_h2d_async, _C events) run after the build.
#                          Result: pass (N passed) / fail (names) / skip / timeout.
#   h2d               40   "h2d torch pinned ..." then "h2d copy_h2d_async backend=c (our expert-load path)" (and
#                          backend=torch): GB/s of 64 MiB pinned host -> device copies, 10 per variant after 2
#                          warm-ups, each timed by CUDA events on a side stream; peak (fastest copy) and median;
#                          ours as a ratio of torch's peak; the bytes are checked after the copy.
#   qbench            60   "triton qlinear bB N=.. RxC dtype" rows: moe_engine.quant.triton_qmatmul.qlinear_triton
#                          vs its torch twin moe_engine._ops.qmatrix.qlinear_reference (group 64; 2/3/4/8 bits at
#                          N=1, 4 bits at N=16 and N=100, 4096x4096 and 14336x4096): pass when max |y-ref|/max|ref|
#                          is within tests/test_quant_triton.py's tolerance; us per call of both (CUDA events, mean
#                          of 20) and the packed-weight GB/s of the kernel.
#   checkpoint        90   "decode checkpoint": made / reused / given / fail (-> the bundled tiny model); made in the
#                          background from the start, and waited for before h2d, so nothing timed shares the host.
#   decode           100   "decode tok/s, all experts in GPU memory": moe_engine.load(model, device="cuda"), greedy
#                          64 tokens after a 32-id prompt and an 8-token warm-up, stats()["latency"]. "decode tok/s,
#                          0.25 of experts cached": the same with gpu_mem from bench_offload.fraction_budget over the
#                          all-resident plan (a quarter of the expert slots); notes: hit rate, loads, H2D bytes.
#   "total wall time": the whole run. Worst case, every step at its limit: 20 + 5 + 25 + max(200, 100 + 30 (the
#   import check after the build) + 60) + 40 + 60 + 100 = 450 s; GPU_CHECK_TOTAL_S (470) is the backstop that
#   shrinks the late steps' limits. Expected on an H200: ~3-4 minutes, most of it Triton compiles.
set -u
set -o pipefail

CALLER_PWD=$(pwd)
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 0
PY=${PYTHON:-python3}
T0=$(date +%s)
DEADLINE=$((T0 + ${GPU_CHECK_TOTAL_S:-470}))
FORCE=${GPU_CHECK_FORCE:-0}
T_PROBE=20; T_TRITON_INSTALL=25
T_BUILD=${T_BUILD:-100}; T_TESTS_TRITON=${T_TESTS_TRITON:-200}; T_TESTS_OTHER=${T_TESTS_OTHER:-60}
T_H2D=${T_H2D:-40}; T_QBENCH=${T_QBENCH:-60}; T_CKPT=${T_CKPT:-90}; T_DECODE=${T_DECODE:-100}

DEST=${OUT:-}
[ -n "$DEST" ] && [ "${DEST#/}" = "$DEST" ] && DEST="$CALLER_PWD/$DEST"     # relative: to the caller's directory
if [ -n "$DEST" ] && [ -d "$DEST" ]; then
    MD="$DEST/gpu_check.md"; LOGF="$DEST/gpu_check.log"
elif [ -n "$DEST" ]; then
    MD="$DEST"; LOGF="${DEST%.md}.log"
else
    MD="$CALLER_PWD/gpu_check.md"; LOGF="$CALLER_PWD/gpu_check.log"
fi
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
ROWS="$WORK/rows.tsv"
: > "$ROWS"
export PYTHONPATH="$ROOT/bench:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BG_PIDS=()
# shellcheck disable=SC2154  # p: the loop variable inside the trap string
trap 'for p in ${BG_PIDS[@]+"${BG_PIDS[@]}"}; do pkill -TERM -P "$p" 2>/dev/null; kill "$p" 2>/dev/null; done; exit 130' INT TERM

say() { echo "[gpu_check $(( $(date +%s) - T0 ))s] $*" >&2; }
oneline() { tr '\t\n\r|' '   /' | sed 's/  */ /g; s/^ //; s/ $//' | cut -c1-"${1:-400}"; }
row() {   # what result notes
    printf '%s\t%s\t%s\n' "$1" "$2" "$(printf '%s' "$3" | oneline 1200)" >> "$ROWS"
    say "$1: $2 — $3"
}
nrows() { wc -l < "$ROWS" | tr -d ' '; }
cap() {   # a step's limit: its budget, or what is left of the total, the smaller (at least 1 s)
    local want=$1 left=$((DEADLINE - $(date +%s)))
    [ "$left" -lt 1 ] && left=1
    [ "$want" -gt "$left" ] && want=$left
    echo "$want"
}
# run_step NAME LIMIT CMD...: runs CMD under timeout into $WORK/NAME.log; sets STEP_RC, STEP_S; if it timed out,
# or failed without writing a row, writes a row saying so (rows it did write stay).
run_step() {
    local name=$1 limit=$2; shift 2
    local before start
    before=$(nrows); start=$(date +%s)
    say "step $name (limit ${limit}s): $*"
    timeout -k 5 "$limit" "$@" > "$WORK/$name.log" 2>&1
    STEP_RC=$?; STEP_S=$(( $(date +%s) - start ))
    if [ "$STEP_RC" -eq 124 ] || [ "$STEP_RC" -eq 137 ]; then
        row "$name" "timeout" "killed after ${limit} s; $(( $(nrows) - before )) row(s) above finished; last output: $(tail -n 2 "$WORK/$name.log" | oneline 300)"
    elif [ "$STEP_RC" -ne 0 ] && [ "$(nrows)" -eq "$before" ]; then
        row "$name" "fail" "rc $STEP_RC after ${STEP_S} s: $(tail -n 3 "$WORK/$name.log" | oneline 400)"
    fi
}
# pytest_row WHAT LOG RC SECONDS LIMIT: one row from a `pytest -v -rfEs` log
pytest_row() {
    local what=$1 log=$2 rc=$3 secs=$4 limit=$5
    local summary passed failed errors skipped names skips
    summary=$(grep -E "[0-9]+ (passed|failed|skipped|errors?|deselected)|no tests ran" "$log" | tail -n 1 | tr -d '=' | oneline 200)
    passed=$(grep -cE " PASSED( |$)" "$log"); failed=$(grep -cE " FAILED( |$)" "$log")
    errors=$(grep -cE " ERROR( |$)" "$log"); skipped=$(grep -cE " SKIPPED( |$)" "$log")
    names=$(grep -E "^(FAILED|ERROR) " "$log" | head -n 4 | cut -c1-220 | oneline 900)
    skips=$(grep -E "^SKIPPED " "$log" | head -n 2 | cut -c1-160 | oneline 400)
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
        row "$what" "timeout" "killed after ${limit} s with $passed passed, $failed failed, $skipped skipped so far; $names"
    elif [ "$failed" -gt 0 ] || [ "$errors" -gt 0 ] || { [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ]; }; then
        row "$what" "fail" "$failed failed, $errors errors, $passed passed, $skipped skipped in ${secs} s (rc $rc): $names ${summary:-$(tail -n 3 "$log" | oneline 300)}"
    elif [ "$passed" -gt 0 ]; then
        row "$what" "pass ($passed passed)" "${summary}; $skipped skipped; ${secs} s${skips:+; $skips}"
    elif [ "$skipped" -gt 0 ]; then
        row "$what" "skip" "all $skipped selected tests skipped: $skips"
    else
        row "$what" "fail" "no CUDA test collected (rc $rc): ${summary:-$(tail -n 3 "$log" | oneline 300)}"
    fi
}
PYTEST=("$PY" -m pytest -v -rfEs -p no:cacheprovider -p gpu_check)

# ---------------------------------------------------------------------------------------------- probe
SMI=""
if command -v nvidia-smi > /dev/null 2>&1; then
    SMI=$(timeout 10 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 1 | oneline 200)
    SMI="nvidia-smi: $SMI"
fi
run_step probe "$(cap "$T_PROBE")" "$PY" bench/gpu_check.py probe --rows "$ROWS" --smi "$SMI"
HAS_GPU=$(grep -oE '^has_gpu=[01]' "$WORK/probe.log" | cut -d= -f2); HAS_GPU=${HAS_GPU:-0}
HAS_TRITON=$(grep -oE '^triton=[01]' "$WORK/probe.log" | cut -d= -f2); HAS_TRITON=${HAS_TRITON:-0}
TRITON_VERSION=$(grep -E '^triton_version=' "$WORK/probe.log" | cut -d= -f2- | oneline 200)
TRITON_VERSION=${TRITON_VERSION:-unknown}
if ! grep -qE '^has_gpu=' "$WORK/probe.log"; then
    row "GPU" "unknown" "the probe ($PY bench/gpu_check.py probe) did not run to the end; GPU steps are not run"
fi
RUN_GPU=$HAS_GPU; [ "$FORCE" = 1 ] && RUN_GPU=1
NO_GPU="no CUDA device visible to torch (see the GPU row); not run"

# ---------------------------------------------------------------------------------------------- toolkit
NVCC=$(command -v nvcc 2>/dev/null || true)
if [ -z "$NVCC" ]; then
    for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda; do
        if [ -n "$d" ] && [ -x "$d/bin/nvcc" ]; then NVCC="$d/bin/nvcc"; break; fi
    done
fi
CUDA_ROOT=""   # setup.py's _cuda_home() order: $CUDA_HOME, $CUDA_PATH, nvcc's root, /usr/local/cuda (with cuda_runtime.h)
for d in "${CUDA_HOME:-}" "${CUDA_PATH:-}" "${NVCC:+$(dirname "$(dirname "$(readlink -f "$NVCC")")")}" /usr/local/cuda; do
    if [ -n "$d" ] && [ -f "$d/include/cuda_runtime.h" ]; then CUDA_ROOT=$d; break; fi
done
HDR="cuda_runtime.h under $CUDA_ROOT"; [ -z "$CUDA_ROOT" ] && HDR="NO cuda_runtime.h under \$CUDA_HOME, \$CUDA_PATH, nvcc's root or /usr/local/cuda"
if [ -n "$NVCC" ]; then
    NVCC_VER=$(timeout 5 "$NVCC" --version 2>/dev/null | grep -oE 'release [0-9.]+' | head -n 1)
    row "CUDA toolkit (nvcc)" "${NVCC_VER:-found}" "$NVCC; $HDR (setup.py compiles _C's CUDA parts when it finds cuda_runtime.h and cudart)"
else
    row "CUDA toolkit (nvcc)" "absent" "no nvcc on PATH, in \$CUDA_HOME, \$CUDA_PATH or /usr/local/cuda: moe_engine._C builds WITHOUT its CUDA parts (setup.py may still find a toolkit without nvcc; the build row says what was built); copy_h2d_async and pinned buffers then use torch; the other steps still run"
fi

# ---------------------------------------------------------------------------------------------- triton
if [ "$HAS_TRITON" = 1 ]; then
    row "triton" "$TRITON_VERSION" "imports"
elif [ "$RUN_GPU" = 1 ]; then
    if ls .whl/triton-*.whl > /dev/null 2>&1; then
        run_step triton-install "$(cap "$T_TRITON_INSTALL")" "$PY" -m pip install -q --no-index --find-links .whl triton
    else
        run_step triton-install "$(cap "$T_TRITON_INSTALL")" env PIP_DEFAULT_TIMEOUT=5 "$PY" -m pip install -q --retries 0 triton
    fi
    if "$PY" -c "import triton" > /dev/null 2>&1; then
        HAS_TRITON=1
        row "triton" "$("$PY" -c 'import triton; print(triton.__version__)' 2>&1 | oneline 50)" "installed now by pip install triton"
    else
        row "triton" "absent" "did not import ($TRITON_VERSION) and pip install triton failed (rc $STEP_RC: $(tail -n 1 "$WORK/triton-install.log" | oneline 200)); the Triton tests skip and the qlinear rows fail"
    fi
else
    row "triton" "absent" "$TRITON_VERSION; not installed: $NO_GPU"
fi

# ---------------------------------------------------------------------------------------------- background jobs
# (A) the Triton CUDA tests need no _C: run them now, next to the build (MOE_ENGINE_NO_EXT=1: no half-built _C)
TRITON_TESTS=""; [ -f tests/test_quant_triton.py ] && TRITON_TESTS=tests/test_quant_triton.py
PID_A=""
if [ "$RUN_GPU" = 1 ] && [ -n "$TRITON_TESTS" ]; then
    LIMIT_A=$(cap "$T_TESTS_TRITON"); START_A=$(date +%s)
    say "background: CUDA tests in $TRITON_TESTS (limit ${LIMIT_A}s)"
    ( MOE_ENGINE_NO_EXT=1 timeout -k 5 "$LIMIT_A" "${PYTEST[@]}" "$TRITON_TESTS" > "$WORK/tests-triton.log" 2>&1
      echo $? > "$WORK/tests-triton.rc" ) &
    PID_A=$!; BG_PIDS+=("$PID_A")
fi
# (C) the decode checkpoint, made on the CPU meanwhile
MODEL=${1:-${GPU_CHECK_MODEL:-}}
CK=${GPU_CHECK_CKPT:-${TMPDIR:-/tmp}/moe-gpu-check-ckpt}
CK_STATE=""; PID_C=""
if [ -n "$MODEL" ]; then
    CK_STATE="given"
elif [ "$RUN_GPU" != 1 ]; then
    CK_STATE="skip"
elif [ -f "$CK/.gpu_check_complete" ]; then
    CK_STATE="reused"; MODEL=$CK
else
    LIMIT_C=$(cap "$T_CKPT"); START_C=$(date +%s)
    say "background: bench checkpoint -> $CK (limit ${LIMIT_C}s)"
    ( OMP_NUM_THREADS=4 timeout -k 5 "$LIMIT_C" "$PY" bench/make_checkpoint.py "$CK" --force --hidden 1024 --ffn 1024 \
          --layers 4 --heads 16 --kv-heads 4 --experts 16 --top-k 2 --vocab 2048 --context 2048 --dtype bfloat16 \
          --no-tokenizer > "$WORK/checkpoint.log" 2>&1
      rc=$?; [ "$rc" -eq 0 ] && touch "$CK/.gpu_check_complete"; echo "$rc" > "$WORK/checkpoint.rc"
      echo $(( $(date +%s) - START_C )) > "$WORK/checkpoint.s" ) &
    PID_C=$!; BG_PIDS+=("$PID_C")
fi

# ---------------------------------------------------------------------------------------------- build
if [ "$RUN_GPU" = 1 ]; then
    run_step build "$(cap "$T_BUILD")" "$PY" setup.py build_ext --inplace
    run_step ext 30 "$PY" bench/gpu_check.py ext --rows "$ROWS" --build-rc "$STEP_RC" --build-s "$STEP_S" --log "$WORK/build.log"
else
    row "build moe_engine._C" "skip" "$NO_GPU (not rebuilt in place on a machine without a GPU: that would replace the extension this checkout uses)"
fi

# ---------------------------------------------------------------------------------------------- CUDA tests
mapfile -t OTHER_FILES < <(grep -lis cuda tests/test_*.py 2>/dev/null | grep -v "^${TRITON_TESTS:-NONE}\$")
OTHER_TESTS=${OTHER_FILES[*]+"${OTHER_FILES[*]}"}
if [ "$RUN_GPU" = 1 ] && [ -n "$OTHER_TESTS" ]; then
    LIMIT_B=$(cap "$T_TESTS_OTHER"); START_B=$(date +%s)
    say "step tests-other (limit ${LIMIT_B}s): $OTHER_TESTS"
    timeout -k 5 "$LIMIT_B" "${PYTEST[@]}" "${OTHER_FILES[@]}" > "$WORK/tests-other.log" 2>&1
    RC_B=$?
    pytest_row "CUDA tests: $(echo "$OTHER_TESTS" | sed 's#tests/##g; s/ *$//; s/ /, /g')" "$WORK/tests-other.log" "$RC_B" \
        "$(( $(date +%s) - START_B ))" "$LIMIT_B"
else
    if [ -n "$OTHER_TESTS" ]; then row "CUDA tests: other files" "skip" "$NO_GPU ($OTHER_TESTS)"
    else row "CUDA tests: other files" "skip" "no test file other than the Triton one mentions cuda"; fi
fi
if [ -n "$PID_A" ]; then
    wait "$PID_A"
    pytest_row "CUDA tests: test_quant_triton.py (Triton grid; MOE_ENGINE_NO_EXT=1)" "$WORK/tests-triton.log" \
        "$(cat "$WORK/tests-triton.rc" 2>/dev/null || echo 1)" "$(( $(date +%s) - START_A ))" "$LIMIT_A"
else
    if [ -n "$TRITON_TESTS" ]; then row "CUDA tests: test_quant_triton.py" "skip" "$NO_GPU"
    else row "CUDA tests: test_quant_triton.py" "skip" "tests/test_quant_triton.py is missing"; fi
fi

# ---------------------------------------------------------------------------------------------- h2d, Triton
# the checkpoint job (host memory traffic) ends before anything is timed
if [ -n "$PID_C" ]; then
    wait "$PID_C"
    CK_RC=$(cat "$WORK/checkpoint.rc" 2>/dev/null || echo 1); CK_S=$(cat "$WORK/checkpoint.s" 2>/dev/null)
    if [ "$CK_RC" -eq 0 ] && [ -f "$CK/.gpu_check_complete" ]; then
        CK_STATE="made"; MODEL=$CK
    else
        CK_STATE="fail"
    fi
fi
run_step h2d "$(cap "$T_H2D")" "$PY" bench/gpu_check.py h2d --rows "$ROWS" --mib 64 --reps 10
run_step qbench "$(cap "$T_QBENCH")" "$PY" bench/gpu_check.py triton --rows "$ROWS"

# ---------------------------------------------------------------------------------------------- decode
case "$CK_STATE" in
    given)  row "decode checkpoint" "given" "$MODEL ($(du -sh "$MODEL" 2>/dev/null | cut -f1))" ;;
    reused) row "decode checkpoint" "reused" "$MODEL ($(du -sh "$MODEL" 2>/dev/null | cut -f1)), made by an earlier run" ;;
    made)   row "decode checkpoint" "made" "$MODEL ($(du -sh "$MODEL" 2>/dev/null | cut -f1)) by bench/make_checkpoint.py in ${CK_S:-?} s: mixtral, hidden 1024, ffn 1024, 4 layers x 16 experts, top-2, bf16" ;;
    fail)   MODEL=moe_engine/models/tiny-moe
            row "decode checkpoint" "fail" "make_checkpoint rc $CK_RC: $(tail -n 2 "$WORK/checkpoint.log" | oneline 300); falling back to the bundled $MODEL" ;;
    skip)   row "decode checkpoint" "skip" "$NO_GPU" ;;
esac
if [ "$RUN_GPU" = 1 ]; then
    run_step decode "$(cap "$T_DECODE")" "$PY" bench/gpu_check.py decode --rows "$ROWS" --model "$MODEL" --fraction 0.25 --tokens 64
else
    "$PY" bench/gpu_check.py decode --rows "$ROWS" --model "${MODEL:-moe_engine/models/tiny-moe}" > "$WORK/decode.log" 2>&1 \
        || row "decode" "skip" "$NO_GPU"
fi

row "total wall time" "$(( $(date +%s) - T0 )) s" "limit ${GPU_CHECK_TOTAL_S:-470} s; step logs in $LOGF"

# ---------------------------------------------------------------------------------------------- the table
{
    REV=$(git rev-parse --short HEAD 2>/dev/null) && { git diff --quiet HEAD 2>/dev/null || REV="$REV+changes"; }
    echo "moe-engine GPU check, $(date -u +%Y-%m-%dT%H:%MZ), commit ${REV:-unknown (no git here)}:"
    echo
    echo "| check | result | notes |"
    echo "|---|---|---|"
    while IFS=$'\t' read -r what result notes; do
        printf '| %s | %s | %s |\n' "$what" "$result" "$notes"
    done < "$ROWS"
} > "$WORK/table.md"
mkdir -p "$(dirname "$MD")" 2>/dev/null
cp "$WORK/table.md" "$MD" 2>/dev/null || say "could not write $MD"
for f in "$WORK"/*.log; do
    [ -f "$f" ] || continue
    echo "===== $(basename "$f") (last 300 lines)"
    tail -n 300 "$f" | cut -c1-2000
done > "$LOGF" 2>/dev/null || say "could not write $LOGF"
cat "$WORK/table.md"
rm -rf "$WORK"
exit 0
