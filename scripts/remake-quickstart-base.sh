#!/usr/bin/env bash
# Remakes assets/quickstart/base: a random Llama with a character tokenizer, taught task A
# (repeat / reverse / shout a word) by full fine-tuning with `lora train --full`.
# About 10-20 minutes on 2 cores. Usage: scripts/remake-quickstart-base.sh [WORK_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
cargo build --release
cargo run --release --example make_quickstart_base -- "$work"
./target/release/lora train --full --model "$work/init" --data "$work/task_a.jsonl" \
  --out "$work/base-run" --steps 1500 --batch-size 32 --lr 3e-3 --schedule cosine \
  --warmup-steps 50 --weight-decay 0.01 --max-grad-norm 1.0 --save-every 500 --seed 0
cp "$work/base-run/"{config.json,tokenizer.json,model.safetensors} assets/quickstart/base/
echo "assets/quickstart/base remade from $work"
