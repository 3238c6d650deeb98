#!/usr/bin/env bash
# Runs `lora bench --json` and the PyTorch + PEFT baseline back to back with the same thread
# count and prints every shared key with ours / PEFT (below 1 means we are faster or smaller;
# for tokens/s above 1 is better). The ratio arithmetic needs only a plain python3.
#
#   scripts/bench-vs-peft.sh
#
# Environment:
#   THREADS        threads for both sides (default 2): RAYON_NUM_THREADS for candle, --threads
#                  (torch.set_num_threads) for PyTorch
#   RUNS           timed runs per layer measurement (default 15; the Llama step max(5, RUNS/3))
#   PEFT_PYTHON    a Python with torch, transformers and peft (default: /work/peft-venv/bin/python
#                  when present, else python3)
#   PEFT_BASELINE  peft_baseline.py (default: ../shared/bench/peft_baseline.py next to the repo)
#   OUT            folder for ours.json and peft.json (default: a fresh temp folder)
#   PAIRS          how many back-to-back pairs to run (default 1). With more than one, each
#                  pair's JSON goes to OUT/pair-N/ and the end prints every pair's ratios and
#                  their medians: on a noisy machine one pair says little.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
threads=${THREADS:-2}
runs=${RUNS:-15}
default_py=python3
[[ -x /work/peft-venv/bin/python ]] && default_py=/work/peft-venv/bin/python
py=${PEFT_PYTHON:-$default_py}
baseline=${PEFT_BASELINE:-$root/../shared/bench/peft_baseline.py}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"

if [[ ! -f $baseline ]]; then
    echo "error: $baseline: no such file (set PEFT_BASELINE)" >&2
    exit 1
fi

(cd "$root" && cargo build --release --quiet)
pairs=${PAIRS:-1}

# One pair: ours, then PEFT, into folder $1.
run_pair() {
    local dir=$1
    mkdir -p "$dir"
    echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
    echo "lora bench (RAYON_NUM_THREADS=$threads, --runs $runs) ..." >&2
    RAYON_NUM_THREADS=$threads "$root/target/release/lora" bench --runs "$runs" --json "$dir/ours.json" >/dev/null
    echo "PyTorch + PEFT baseline (--threads $threads, --runs $runs) ..." >&2
    "$py" "$baseline" --threads "$threads" --runs "$runs" --json "$dir/peft.json" >/dev/null 2>"$dir/peft.stderr"
    echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" >&2
}

# The ratio table of one pair in folder $1.
report() {
    python3 - "$1/ours.json" "$1/peft.json" <<'PY'
import json, sys
ours = json.load(open(sys.argv[1]))
peft = json.load(open(sys.argv[2]))
print(f"threads: ours {ours['threads']}, PEFT {peft['threads']}  (torch {peft['torch']}, candle {ours['candle']})")
keys = ["layer_plain_forward_ms", "layer_lora_train_step_ms", "layer_lora_train_step_with_dx_ms",
        "layer_unmerged_forward_ms", "layer_merged_forward_ms", "llama_lora_train_step_ms",
        "llama_lora_train_tokens_per_s", "peak_rss_mib"]
print(f"{'key':<36}{'ours':>12}{'PEFT':>12}{'ours/PEFT':>11}")
for k in keys:
    a, b = ours.get(k), peft.get(k)
    if a is None or b is None:
        print(f"{k:<36}{'n/a':>12}{'n/a':>12}")
        continue
    print(f"{k:<36}{a:>12.2f}{b:>12.2f}{a / b:>10.2f}x")
um_ours = ours["layer_unmerged_forward_ms"] / ours["layer_merged_forward_ms"]
um_peft = peft["layer_unmerged_forward_ms"] / peft["layer_merged_forward_ms"]
mp_ours = ours["layer_merged_forward_ms"] / ours["layer_plain_forward_ms"]
mp_peft = peft["layer_merged_forward_ms"] / peft["layer_plain_forward_ms"]
print(f"{'unmerged / merged forward':<36}{um_ours:>12.3f}{um_peft:>12.3f}")
print(f"{'merged / plain forward':<36}{mp_ours:>12.3f}{mp_peft:>12.3f}")
m = ours.get("memory", {})
mib = lambda b: "n/a" if b is None else f"{b / 2**20:.2f} MiB"
print("memory ledger (ours, one Llama LoRA training step):")
for k in ["frozen_weight_bytes", "adapter_bytes", "gradient_bytes", "optimizer_state_bytes",
          "peak_step_heap_bytes", "peak_step_heap_bytes_checkpointed"]:
    print(f"  {k:<34}{mib(m.get(k)):>14}")
ck = ours.get("llama_lora_train_step_checkpointed_ms")
if ck is not None:
    print(f"  Llama step with activation checkpointing: {ck:.1f} ms "
          f"({ck / ours['llama_lora_train_step_ms']:.2f}x ours without)")
PY
}

if [[ $pairs -le 1 ]]; then
    run_pair "$out"
    report "$out"
    echo "JSON: $out/ours.json $out/peft.json" >&2
    exit 0
fi

for i in $(seq "$pairs"); do
    echo "pair $i of $pairs" >&2
    run_pair "$out/pair-$i"
done
python3 - "$out" "$pairs" <<'PY'
import json, statistics, sys
out, n = sys.argv[1], int(sys.argv[2])
keys = ["layer_lora_train_step_ms", "layer_lora_train_step_with_dx_ms",
        "llama_lora_train_tokens_per_s", "peak_rss_mib"]
rows = []
for i in range(1, n + 1):
    o = json.load(open(f"{out}/pair-{i}/ours.json"))
    p = json.load(open(f"{out}/pair-{i}/peft.json"))
    r = {k: o[k] / p[k] for k in keys}
    r["unmerged/merged (ours)"] = o["layer_unmerged_forward_ms"] / o["layer_merged_forward_ms"]
    r["merged/plain (ours)"] = o["layer_merged_forward_ms"] / o["layer_plain_forward_ms"]
    rows.append(r)
names = list(rows[0])
short = ["layer step", "step + dX", "Llama tok/s", "peak RSS", "unmerged/merged", "merged/plain"]
print("ours / PEFT per pair (Llama tok/s: our throughput / PEFT's); the last two are ours alone")
print(f"{'pair':<8}" + "".join(f"{h:>17}" for h in short))
for i, r in enumerate(rows, 1):
    print(f"{i:<8}" + "".join(f"{r[k]:>17.3f}" for k in names))
print(f"{'median':<8}" + "".join(f"{statistics.median(r[k] for r in rows):>17.3f}" for k in names))
PY
echo "JSON: $out/pair-*/ours.json, peft.json" >&2
