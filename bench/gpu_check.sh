#!/usr/bin/env bash
# GPU check: GPT-2 124M (random weights) training throughput on CUDA in bf16, ours without and with
# --compile (and the transformers.Trainer baseline), with MFU against the GPU's measured bf16 matmul peak
# and against a datasheet peak (H200/H100 SXM bf16 dense: 989 TFLOP/s). Meant to finish in < 5 minutes.
#
#   bash bench/gpu_check.sh                      # on a CUDA machine
#   bash bench/gpu_check.sh --device cpu --steps 2 --skip 1 --no-trainer   # dry check of the CPU parts
#
# Needs python with torch + transformers already installed (nothing is downloaded). Builds the model
# from ../shared/gpt2-tokenizer (or ./shared/gpt2-tokenizer) when present, else from GPT2Config() with a
# stand-in tokenizer of the same vocabulary size.
set -euo pipefail

usage() {
  cat <<'EOF'
usage: bash bench/gpu_check.sh [options]
  --device cuda|cpu       device (default cuda; cpu only for a dry check)
  --steps N               optimizer steps per run (default 300)
  --skip N                first steps left out of tokens/s (default 50; compile warm-up is excluded too)
  --batch-size N          sequences per step (default 4)
  --block-size N          tokens per sequence (default 256)
  --model gpt2|small      gpt2 = 124M architecture (default)
  --peak-tflops X         datasheet bf16 peak for the second MFU column (default 989 = H200/H100 SXM)
  --no-trainer            skip the transformers.Trainer baseline
  --no-compile            skip the --compile runs
  --python PATH           interpreter (default: .venv/bin/python if present, else python3)
  --work-dir DIR          models, data, runs (default /tmp/finetune-bench-gpu)
  --timeout S             give up on the whole check after S seconds (default 290)
EOF
}

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DEVICE=cuda STEPS=300 SKIP=50 BATCH=4 BLOCK=256 MODEL=gpt2 PEAK=989 TRAINER=1 COMPILE=1
PY="" WORK=/tmp/finetune-bench-gpu TIMEOUT=290
while [[ $# -gt 0 ]]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --steps) STEPS="$2"; shift 2 ;;
    --skip) SKIP="$2"; shift 2 ;;
    --batch-size) BATCH="$2"; shift 2 ;;
    --block-size) BLOCK="$2"; shift 2 ;;
    --model) MODEL="$2"; shift 2 ;;
    --peak-tflops) PEAK="$2"; shift 2 ;;
    --no-trainer) TRAINER=0; shift ;;
    --no-compile) COMPILE=0; shift ;;
    --python) PY="$2"; shift 2 ;;
    --work-dir) WORK="$2"; shift 2 ;;
    --timeout) TIMEOUT="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
done
if [[ -z "$PY" ]]; then
  if [[ -x "$REPO/.venv/bin/python" ]]; then PY="$REPO/.venv/bin/python"; else PY=python3; fi
fi
TOK=""
for candidate in "$REPO/../shared/gpt2-tokenizer" "$REPO/shared/gpt2-tokenizer"; do
  if [[ -f "$candidate/config.json" ]]; then TOK="$candidate"; break; fi
done

cd "$REPO"
"$PY" - "$DEVICE" <<'EOF'
import sys
try:
    import torch, transformers
except ImportError as exc:
    sys.exit(f"error: {exc}; this check needs python with torch and transformers installed")
print(f"torch {torch.__version__}, transformers {transformers.__version__}")
if sys.argv[1] == "cuda":
    if not torch.cuda.is_available():
        sys.exit("error: no CUDA device visible (use --device cpu for a dry check)")
    print(f"GPU: {torch.cuda.get_device_name(0)}, bf16 supported: {torch.cuda.is_bf16_supported()}")
EOF
echo "tokenizer/config: ${TOK:-absent, using GPT2Config() and a stand-in tokenizer}"

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
DEADLINE=$((SECONDS + TIMEOUT))
common=(--device "$DEVICE" --model "$MODEL" --precision bf16 --steps "$STEPS" --skip "$SKIP" --rounds 1
        --batch-size "$BATCH" --block-size "$BLOCK" --datasheet-tflops "$PEAK" --matmul-seconds 2
        --tokenizer-dir "$TOK" --work-dir "$WORK" --timeout 240)
left() { echo $((DEADLINE - SECONDS)); }

contenders=ours
[[ $TRAINER == 1 ]] && contenders=ours,trainer
echo; echo "== bf16, eager (no --compile): $contenders"
timeout "$(left)" "$PY" bench/train_throughput.py "${common[@]}" --contenders "$contenders" \
  --json "$WORK/gpu-eager.json" || echo "(eager run failed or timed out: rc $?)"
if [[ $COMPILE == 1 ]]; then
  if (( $(left) < 60 )); then
    echo "not enough time left for the --compile runs ($(left) s)"; exit 1
  fi
  echo; echo "== bf16, --compile: ours"
  timeout "$(left)" "$PY" bench/train_throughput.py "${common[@]}" --contenders ours \
    --ours-args=--compile --json "$WORK/gpu-compile.json" || echo "(compile run failed or timed out: rc $?)"
fi

# FSDP (issue 22), only with more than one GPU: a short --fsdp run over every GPU in bf16 (bf16 gathered
# weights, fp32 gradient reduction, fp32 master shards), then a resume of its checkpoint on half the GPUs
# (DCP reshards it). Prints the last training lines of each.
NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [[ $DEVICE == cuda && $NGPU -gt 1 ]]; then
  if (( $(left) < 60 )); then echo "not enough time left for the --fsdp runs ($(left) s)"; exit 1; fi
  echo; echo "== bf16, --fsdp on $NGPU GPUs, then resumed on $((NGPU / 2))"
  read -r MDIR DDIR < <("$PY" - "$MODEL" "$WORK" "$TOK" <<'PYEOF'
import sys
from pathlib import Path
sys.path.insert(0, "bench")
from _common import build_model_dir, write_data_dir
model, work, tok = sys.argv[1], Path(sys.argv[2]), sys.argv[3]
model_dir = build_model_dir(model, work, Path(tok) if tok else None)
print(model_dir, write_data_dir(work / "data-fsdp", model_dir))
PYEOF
)
  timeout "$(left)" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$NGPU" finetune_generative.py \
    --model "$MDIR" --data-dir "$DDIR" --output-dir "$WORK/out-fsdp" --overwrite --fsdp --precision bf16 \
    --batch-size "$BATCH" --block-size "$BLOCK" --max-steps 40 --eval-every 0 --eval-batches 2 --log-every 10 \
    --save-every 20 --num-workers 2 && tail -n 2 "$WORK/out-fsdp/metrics.jsonl" || echo "(fsdp run failed: rc $?)"
  rm -rf "$WORK/out-fsdp/checkpoint-40"
  timeout "$(left)" "$PY" -m torch.distributed.run --standalone --nproc_per_node "$((NGPU / 2))" \
    finetune_generative.py --output-dir "$WORK/out-fsdp" --resume && tail -n 2 "$WORK/out-fsdp/metrics.jsonl" \
    || echo "(fsdp resume failed: rc $?)"
fi
