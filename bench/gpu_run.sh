#!/usr/bin/env bash
# The ONE script a GPU session runs: kernel tests on CUDA, then the training and scoring
# benchmarks against the HF + PEFT peer, then the largest int8 batch in 14 GiB.
#
#   bash bench/gpu_run.sh --prepare     # once, HERE (CPU machine): fetch the bitsandbytes wheel
#                                       # into .whl/ and copy the peer script into .peer/
#   bash bench/gpu_run.sh               # THERE (any folder: it cd's to the repository root and
#                                       # runs the benchmarks as python3 -m bench.NAME)
#
# Device call: run(command="bash bench/gpu_run.sh", carry=[".whl", ".peer"], timeout_s=600).
# Everything lands in $OUT (default out/gpu): log.txt (all output), train.json, score.json,
# maxbatch.json, peer.jsonl, peer_stderr.txt -- six files, under the tool's eight.
# Stages get shrinking time limits so the whole run ends by $DEADLINE seconds (default 570).
# TRAIN_ARGS / SCORE_ARGS / MAXBATCH_ARGS are appended to those commands, e.g. for a CPU dry run
# (python3 must then be the project's: put .venv/bin first on PATH):
#   PATH=.venv/bin:$PATH OUT=/tmp/g TRAIN_ARGS="--batch 2 --seq 64 --steps 1 --warmup 1" \
#   SCORE_ARGS="--batch 4 --seq 64 --reps 1" bash bench/gpu_run.sh
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
    -h|--help) sed -n '2,/^[^#]/p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    ""|--prepare) ;;
    *) echo "gpu_run.sh: unknown argument ${1} (use --prepare, or nothing)" >&2; exit 2 ;;
esac

if [ "${1:-}" = "--prepare" ]; then
    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2 || exit 1
    mkdir -p .peer && cp ../shared/bench/peer_hf_peft.py .peer/ || exit 1
    du -sh .whl .peer
    exit 0
fi

OUT=${OUT:-out/gpu}
DEADLINE=${DEADLINE:-570}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
TMP=$(mktemp -d)
export PYTHONUNBUFFERED=1
SECONDS=0

stage() { printf '\n=== [%4d s] %s\n' "$SECONDS" "$*" | tee -a "$LOG"; }
# run LIMIT NAME CMD...: CMD under `timeout min(LIMIT, time left)`, output to the log and $TMP/NAME
run() {
    local limit=$1 name=$2; shift 2
    local left=$((DEADLINE - SECONDS))
    [ "$left" -lt "$limit" ] && limit=$left
    if [ "$limit" -lt 20 ]; then echo "skipped: ${limit}s left" | tee -a "$LOG"; return; fi
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" "$TMP/$name"
    local rc=${PIPESTATUS[0]}
    [ "$rc" -ne 0 ] && echo "exit $rc (124 = stage time limit of ${limit}s)" | tee -a "$LOG"
}

stage "install bitsandbytes from .whl/"
if ls .whl/bitsandbytes-*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl 2>&1 | tee -a "$LOG" && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/bitsandbytes-*.whl: carry .whl (bash bench/gpu_run.sh --prepare)" | tee -a "$LOG"
fi
[ -f .peer/peer_hf_peft.py ] || echo "no .peer/peer_hf_peft.py: the peer will be skipped" | tee -a "$LOG"

stage "environment"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv 2>&1 | tee -a "$LOG"
python3 - <<'EOF' 2>&1 | tee -a "$LOG"
import importlib, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for name in ("triton", "bitsandbytes", "transformers", "peft"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "MISSING", repr(e)[:200])
EOF

stage "kernel tests on CUDA (Triton vs reference, then timings)"
run 150 tests python3 -m pytest -q -s -p no:cacheprovider tests/test_kernels.py

stage "training speed: 8b, int8/nf4/bf16 with KERNELS=auto, int8 with KERNELS=torch; peer first"
run 330 train python3 -m bench.train_speed --out "$OUT" --baseline-modes int8 --peer-timeout 260 ${TRAIN_ARGS:-}

stage "scoring speed: 8b, 16 x 512, int8/bf16 (+ int8 with KERNELS=torch); peer rows reused"
PEER=run; [ -s "$OUT/peer.jsonl" ] && PEER="$OUT/peer.jsonl"
run 120 score python3 -m bench.score_speed --out "$OUT" --baseline-modes int8 --peer "$PEER" ${SCORE_ARGS:-}

stage "largest int8 batch x length in 14 GiB"
run 120 maxbatch python3 -m bench.train_speed --find-max-batch --lengths 512,1024,2048,4096 --out "$OUT" \
    ${MAXBATCH_ARGS:-}

stage "summary"
{
    grep -E "passed|failed|error" "$TMP/tests" 2>/dev/null | tail -2
    grep -m1 "^Triton vs PyTorch reference" "$TMP/tests" 2>/dev/null
    echo "  comparison rows: $(grep -cE '^  [a-z0-9_]+ +.*e[-+][0-9]+ *$' "$TMP/tests" 2>/dev/null) ok," \
         "$(grep -c ' FAIL$' "$TMP/tests" 2>/dev/null) FAIL"
    grep ' FAIL$' "$TMP/tests" 2>/dev/null | head -20
    sed -n '/^CUDA timings/,$p' "$TMP/tests" 2>/dev/null | grep -vE "passed|^\.|^s" | head -24
    echo
    sed -n '/^LoRA training step/,$p' "$TMP/train" 2>/dev/null
    echo
    sed -n '/^Scoring,/,$p' "$TMP/score" 2>/dev/null
    echo
    sed -n '/^Largest int8/,$p' "$TMP/maxbatch" 2>/dev/null
} | tee -a "$LOG"
rm -rf "$TMP"
echo "done in ${SECONDS}s; results in $OUT"
