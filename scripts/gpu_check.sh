#!/usr/bin/env bash
# Checks the GPU path on one GPU in about 8 minutes, and says how fast it is:
#   1. a venv of its own (.venv-gpu) that sees the machine's CUDA torch, with the package installed;
#      the optional kernels (mamba-ssm, causal-conv1d, flash-linear-attention) from binary wheels
#      only, unless GPU_CHECK_BUILD=1 allows source builds (those take 10 to 30 minutes);
#   2. the GPU-marked tests (pytest -m gpu);
#   3. every benchmark with --device cuda;
#   4. one short training run per family at a size where MFU means something;
#   5. a summary table: printed, and written to $GPU_CHECK_OUT/summary.md.
# Offline machines: GPU_CHECK_WHEELS=DIR installs from a folder of wheels instead of an index.
# GPU_CHECK_DEVICE=cpu runs the same stages on the CPU at toy sizes (to check the script itself).
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${GPU_CHECK_OUT:-results/gpu_check}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
: >"$LOG"
declare -a STAGES=()

say() { echo "[gpu_check $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }
# stage NAME SECONDS CMD...: runs CMD with a time limit, logs it, and records the outcome
stage() {
    local name=$1 limit=$2 t0 rc
    shift 2
    say "$name: $*"
    t0=$(date +%s)
    timeout "$limit" "$@" >>"$LOG" 2>&1
    rc=$?
    local took=$(($(date +%s) - t0)) what=ok
    [ $rc -eq 124 ] && what="timed out after ${limit}s"
    [ $rc -ne 0 ] && [ $rc -ne 124 ] && what="failed (exit $rc)"
    STAGES+=("| $name | $what | ${took}s |")
    say "$name: $what in ${took}s"
    return 0
}

# ---------------------------------------------------------------- 1. install
[ -x "$VENV/bin/python" ] || python3 -m venv --system-site-packages "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install -q)
[ -n "${GPU_CHECK_WHEELS:-}" ] && PIP+=(--no-index --find-links "$GPU_CHECK_WHEELS")
"$PY" - <<EOF || { say "torch is missing or sees no GPU (GPU_CHECK_DEVICE=$DEVICE)"; exit 1; }
import torch
assert "$DEVICE" == "cpu" or torch.cuda.is_available(), "no CUDA device"
print("torch", torch.__version__, torch.cuda.get_device_name() if "$DEVICE" == "cuda" else "cpu")
EOF
stage install 300 "${PIP[@]}" -e ".[dev]"
if [ "$DEVICE" = cuda ]; then
    if [ "${GPU_CHECK_BUILD:-0}" = 1 ]; then
        stage kernels 1800 "${PIP[@]}" --no-build-isolation mamba-ssm causal-conv1d flash-linear-attention
    else  # a missing wheel leaves the family on its PyTorch path, which the table shows
        stage kernels 300 "${PIP[@]}" --only-binary=:all: flash-linear-attention
        stage kernels-mamba 120 "${PIP[@]}" --only-binary=:all: mamba-ssm causal-conv1d
    fi
fi
"$PY" -c "import harness" || { say "the package does not import"; exit 1; }

# ---------------------------------------------------------------- 2. tests
if [ "$DEVICE" = cuda ]; then
    stage "pytest -m gpu" 240 env HARNESS_SLOW=1 "$PY" -m pytest -q -m gpu tests -p no:cacheprovider
fi

# ---------------------------------------------------------------- 3. benchmarks
if [ "$DEVICE" = cuda ]; then SMALL=(); else SMALL=(--seq-len 128 --repeats 1); fi
stage bench_dispatch 120 "$PY" benchmarks/bench_dispatch.py --device "$DEVICE"
stage bench_scan 120 "$PY" benchmarks/bench_scan.py --device "$DEVICE" "${SMALL[@]}"
stage bench_wkv 120 "$PY" benchmarks/bench_wkv.py --device "$DEVICE" "${SMALL[@]}"
stage bench_train 240 "$PY" benchmarks/bench_train.py --device "$DEVICE"

# ---------------------------------------------------------------- 4. one run per family
if [ "$DEVICE" = cuda ]; then  # Transformer++ at the size of the MFU target: d 1024, 24 layers, seq 2048
    SIZE=(model.d_model=1024 model.seq_len=2048 train.batch_size=8 train.tokens=655360 train.eval_every=40
          train.log_every=10 train.eval_batches=4)
    DEEP=model.n_layers=24
    HALF=model.n_layers=12
else
    SIZE=(model.d_model=64 model.seq_len=64 train.batch_size=4 train.tokens=10240 train.eval_every=40
          train.log_every=10 train.eval_batches=2)
    DEEP=model.n_layers=2
    HALF=model.n_layers=2
fi
RUNS=(
    "gpt2 model=gpt2 $DEEP model.n_heads=16"
    "llama model=llama $DEEP model.n_heads=16"
    "moe model=mixtral $HALF model.n_heads=16"  # 8 experts, top-2
    "soft_moe model=soft_moe $HALF model.n_heads=16"
    "mamba model=mamba $DEEP"
    "mamba2 model=mamba2 $DEEP"
    "rwkv6 model=rwkv6 $HALF"
    "rwkv7 model=rwkv7 $HALF"
)
for spec in "${RUNS[@]}"; do
    read -r -a words <<<"$spec"
    stage "train ${words[0]}" 150 "$VENV/bin/harness-train" "${words[@]:1}" "${SIZE[@]}" sweep=gpu_check \
        "run_name=${words[0]}" "results_dir=$OUT/results" train.progress=false "train.device=$DEVICE"
done

# ---------------------------------------------------------------- 5. summary
{
    echo "# GPU check: $("$PY" -c "import torch; print(torch.cuda.get_device_name() if '$DEVICE' == 'cuda' else 'cpu', 'torch', torch.__version__)")"
    echo
    echo "| stage | outcome | time |"
    echo "| --- | --- | --- |"
    printf '%s\n' "${STAGES[@]}"
    echo
    "$PY" - "$OUT/results" <<'EOF'
import sys
from pathlib import Path

from harness.results import collect

root = Path(sys.argv[1])
df = collect(root) if root.is_dir() else None
if df is None or not len(df):
    print("no training runs were recorded")
    sys.exit()
df = df.assign(tflops=df["train_flops_per_s"] / 1e12, mfu_pct=100 * df["mfu"])
cols = ["run", "arch", "status", "final_val_loss", "tokens_per_s", "tflops", "mfu_pct", "peak_mem_gb", "reason"]
table = df[cols].rename(columns={"tflops": "TFLOP/s", "mfu_pct": "MFU %"})
print(table.to_string(index=False, float_format="{:.4g}".format))
EOF
    echo
    echo "Benchmarks, tests and each stage's output: $LOG"
} | tee "$OUT/summary.md"
