#!/usr/bin/env bash
# Produces the README's before/after example with nothing but this project and what is on disk:
#   text:  the Python reference documentation bundled with CPython (pydoc_data.topics, ~465 KB)
#   model: GPT-2's tokenizer (../shared/gpt2-tokenizer) and a small GPT-2 (4 layers, 128 wide) with
#          random weights, because no pretrained weights can be downloaded on the build machines.
# With network, use --model gpt2 instead of the random model: the "before" is then GPT-2's own voice.
set -euo pipefail
cd "$(dirname "$0")/.."
work=${WORK:-/tmp/before_after}
tokenizer=${TOKENIZER:-../shared/gpt2-tokenizer}
mkdir -p "$work"

python - "$work" "$tokenizer" <<'PY'
import sys, pydoc_data.topics as topics
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel
work, tokenizer_dir = sys.argv[1], sys.argv[2]
open(f"{work}/pydocs.txt", "w").write("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))
tok = AutoTokenizer.from_pretrained(tokenizer_dir)
GPT2LMHeadModel(GPT2Config(n_layer=4, n_embd=128, n_head=4, n_positions=256)).save_pretrained(f"{work}/base")
tok.save_pretrained(f"{work}/base")
PY

python prepare_data.py --input "$work/pydocs.txt" --tokenizer "$work/base" --output-dir "$work/data" \
    --block-size 128 --overwrite
python finetune_generative.py --model "$work/base" --data-dir "$work/data" --output-dir "$work/out" \
    --block-size 128 --batch-size 16 --epochs 3 --lr 2e-3 --warmup-steps 20 --eval-every 60 \
    --sample-prompt "The return statement" --sample-prompt "A list comprehension" \
    --sample-max-new-tokens 40 --overwrite
python - "$work/out/samples.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
last = max(r["step"] for r in rows)
for r in rows:
    if r["step"] in (0, last):
        print(f"step {r['step']:>4} (val loss {r['val_loss']:.2f}): {r['text']!r}")
PY
