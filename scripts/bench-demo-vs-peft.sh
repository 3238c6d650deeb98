#!/usr/bin/env bash
# Runs `lora demo --json` and the PyTorch + PEFT baseline back to back, with the same thread
# count, and prints the seed-shape layer timings side by side as ratios (ours / PEFT).
#
#   scripts/bench-demo-vs-peft.sh
#
# Environment:
#   THREADS        threads for both sides (default 2): RAYON_NUM_THREADS for candle, --threads
#                  (torch.set_num_threads) for PyTorch
#   PEFT_PYTHON    a Python with torch, transformers and peft (default: python3)
#   PEFT_BASELINE  peft_baseline.py (default: ../shared/bench/peft_baseline.py next to the repo)
#   OUT            folder for demo.json and peft.json (default: a fresh temp folder)
# The ratio arithmetic needs only a plain python3 (no torch).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
threads=${THREADS:-2}
py=${PEFT_PYTHON:-python3}
baseline=${PEFT_BASELINE:-$root/../shared/bench/peft_baseline.py}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"

if [[ ! -f $baseline ]]; then
    echo "error: $baseline: no such file (set PEFT_BASELINE)" >&2
    exit 1
fi

(cd "$root" && cargo build --release --quiet)
echo "lora demo (RAYON_NUM_THREADS=$threads) ..." >&2
RAYON_NUM_THREADS=$threads "$root/target/release/lora" demo --json >"$out/demo.json.tmp"
mv "$out/demo.json.tmp" "$out/demo.json"
echo "PyTorch + PEFT baseline (--threads $threads; includes a small Llama step, takes a while) ..." >&2
"$py" "$baseline" --threads "$threads" --json "$out/peft.json" >/dev/null

python3 - "$out/demo.json" "$out/peft.json" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1]))
peft = json.load(open(sys.argv[2]))
c = ours["config"]
print(f"threads: ours {c['threads']}, torch {peft['threads']}  (torch {peft['torch']})")
print(f"{'seed-shape layer forward':<26}{'ours ms':>10}{'PEFT ms':>10}{'ours/PEFT':>11}")
for name, ok, pk in [
    ("plain linear", "plain", "layer_plain_forward_ms"),
    ("LoRA unmerged", "unmerged", "layer_unmerged_forward_ms"),
    ("LoRA merged", "merged", "layer_merged_forward_ms"),
]:
    a, b = ours["speed_ms"][ok], peft[pk]
    print(f"{name:<26}{a:>10.2f}{b:>10.2f}{a / b:>10.2f}x")
m = ours["memory"]
mib = lambda b: "n/a" if b is None else f"{b / 2**20:.2f} MiB"
print(f"train-step peak heap (ours): full FT {mib(m['full_ft_peak_bytes'])}, "
      f"LoRA {mib(m['lora_peak_bytes'])}")
print(f"PEFT process peak RSS (whole script, incl. the Llama step): {peft['peak_rss_mib']:.0f} MiB")
PY
echo "JSON: $out/demo.json $out/peft.json" >&2
