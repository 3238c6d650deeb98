#!/usr/bin/env bash
# LoRA training at a realistic size, ours vs PyTorch + PEFT, back to back on one machine.
#
#   scripts/bench-scale.sh                  # the 111M-parameter Llama of issue 12
#   SIZE=small scripts/bench-scale.sh       # the small Llama of scripts/bench-vs-peft.sh's shape
#
# Makes a random Llama with transformers (`make_llama.py`, untied, hidden 1024, intermediate
# 2816, 8 layers, 16 heads, 8 KV heads, vocab 8192: 111M parameters) plus 256 rows of 256 random
# token ids, once, under target/bench-scale/. Then, PAIRS times, runs
#   ours:  lora train --target-modules q_proj,v_proj --r 8 --alpha 16 --dropout 0 (AdamW)
#   PEFT:  peft_train_step.py (the same LoRA config, torch.optim.AdamW, labels = ids)
# with batch 4 x 256 tokens for STEPS optimizer steps each, and prints tokens/s (median step,
# first step left out) and peak RSS per side and their ratios (ours / PEFT; tokens/s above 1 and
# RSS below 1 favour us), then the medians of the ratios over the pairs.
#
# Environment:
#   THREADS      threads for both sides (default 2)
#   STEPS        optimizer steps per run (default 6; the first is left out of the median)
#   PAIRS        back-to-back pairs (default 1)
#   SIZE         111m (default) or small (hidden 256, intermediate 688, 4 layers, 8/4 heads, vocab 2048)
#   PEFT_PYTHON  a Python with torch, transformers and peft (default /work/peft-venv/bin/python when
#                present, else python3)
#   BENCH_DIR    the folder with make_llama.py and peft_train_step.py (default ../shared/bench)
#   LORA_BIN     our binary (default target/release/lora, built if missing)
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
threads=${THREADS:-2}
steps=${STEPS:-6}
pairs=${PAIRS:-1}
size=${SIZE:-111m}
default_py=python3
[[ -x /work/peft-venv/bin/python ]] && default_py=/work/peft-venv/bin/python
py=${PEFT_PYTHON:-$default_py}
bench=${BENCH_DIR:-$root/../shared/bench}
bin=${LORA_BIN:-$root/target/release/lora}
batch=4

case "$size" in
  111m) dims="1024 2816 8 16 8 8192 256" ;;
  small) dims="256 688 4 8 4 2048 256" ;;
  *) echo "SIZE must be 111m or small, not '$size'" >&2; exit 2 ;;
esac

model="$root/target/bench-scale/llama-$size"
if [[ ! -f "$model/model.safetensors" || ! -f "$model/data.jsonl" ]]; then
  echo "making the $size Llama under $model"
  mkdir -p "$model"
  # shellcheck disable=SC2086
  OMP_NUM_THREADS=$threads "$py" "$bench/make_llama.py" "$model" $dims >"$model/params.txt"
fi
echo "model: $model ($(cat "$model/params.txt") parameters), batch $batch x 256, $steps steps, $threads threads"
[[ -x "$bin" ]] || (cd "$root" && cargo build --release --bin lora)

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ratios=()
for p in $(seq 1 "$pairs"); do
  rm -rf "$work/ours"
  RAYON_NUM_THREADS=$threads "$bin" train --model "$model" --data "$model/data.jsonl" --out "$work/ours" \
    --target-modules q_proj,v_proj --r 8 --alpha 16 --dropout 0 --lr 1e-4 --schedule constant \
    --max-grad-norm 0 --batch-size "$batch" --steps "$steps" --save-every 0 --no-shuffle \
    >"$work/ours.log" 2>&1 || { cat "$work/ours.log" >&2; exit 1; }
  peft_json=$(OMP_NUM_THREADS=$threads "$py" "$bench/peft_train_step.py" "$model" "$batch" "$steps" --threads "$threads")
  line=$("$py" - "$work/ours/metrics.jsonl" "$work/ours.log" "$peft_json" <<'EOF'
import json, re, statistics, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
tps = [r["tokens_per_s"] for r in rows if "tokens_per_s" in r][1:]
ours_tps = statistics.median(tps)
m = re.search(r"peak RSS (\d+) MiB", open(sys.argv[2]).read())
ours_rss = float(m.group(1)) if m else float("nan")
peft = json.loads(sys.argv[3])
print(f"{ours_tps:.1f} {peft['tokens_per_s']:.1f} {ours_tps / peft['tokens_per_s']:.3f} "
      f"{ours_rss:.0f} {peft['peak_rss_mib']:.0f} {ours_rss / peft['peak_rss_mib']:.3f}")
EOF
)
  read -r ot pt tr orss prss rr <<<"$line"
  echo "pair $p: tokens/s ours $ot, PEFT $pt (ratio $tr); peak RSS ours $orss MiB, PEFT $prss MiB (ratio $rr)"
  ratios+=("$tr $rr")
done
printf '%s\n' "${ratios[@]}" | "$py" -c '
import statistics, sys
rows = [tuple(map(float, l.split())) for l in sys.stdin if l.strip()]
print(f"median of {len(rows)} pairs: tokens/s ours/PEFT {statistics.median(r[0] for r in rows):.3f}, "
      f"peak RSS ours/PEFT {statistics.median(r[1] for r in rows):.3f}")'
