#!/usr/bin/env bash
# Serving throughput side by side: `lora bench --serving` (ours) and scripts/peft_serving.py
# (PyTorch + PEFT's `adapter_names` mixed batch), alternating, PAIRS times, same thread count.
# Prints each pair's figures and the medians of: our mixed/single ratio, PEFT's, and our mixed
# tokens/s over PEFT's.
#
#   scripts/bench-serving-vs-peft.sh
#
# Environment: THREADS (default 2), PAIRS (default 3), RUNS (our runs per pair, default 9, i.e.
# 3 alternating single/mixed runs), PEFT_RUNS (default 1), PEFT_PYTHON (default
# /work/peft-venv/bin/python when present, else python3), OUT (default: a temp folder).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
threads=${THREADS:-2}
pairs=${PAIRS:-3}
runs=${RUNS:-9}
peft_runs=${PEFT_RUNS:-1}
default_py=python3
[[ -x /work/peft-venv/bin/python ]] && default_py=/work/peft-venv/bin/python
py=${PEFT_PYTHON:-$default_py}
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
(cd "$root" && cargo build --release --quiet)

for i in $(seq 1 "$pairs"); do
    RAYON_NUM_THREADS=$threads "$root/target/release/lora" bench --serving --runs "$runs" \
        --json "$out/ours-$i.json" >/dev/null
    "$py" "$root/scripts/peft_serving.py" --threads "$threads" --runs "$peft_runs" \
        --json "$out/peft-$i.json" >/dev/null 2>&1
done

python3 - "$out" "$pairs" <<'PY'
import json, sys
out, pairs = sys.argv[1], int(sys.argv[2])
med = lambda v: sorted(v)[len(v) // 2]
rows = []
for i in range(1, pairs + 1):
    o = json.load(open(f"{out}/ours-{i}.json")); p = json.load(open(f"{out}/peft-{i}.json"))
    r = dict(ours_single=o["serve_single_adapter_tokens_per_s"], ours_mixed=o["serve_mixed_8_adapters_tokens_per_s"],
             peft_single=p["peft_serve_single_adapter_tokens_per_s"], peft_mixed=p["peft_serve_mixed_8_adapters_tokens_per_s"],
             ttft_ms=o["serve_mixed_ttft_ms"], load_p50_ms=o["serve_load_p50_ms"], load_p99_ms=o["serve_load_p99_ms"],
             load_failed=o["serve_load_failed"])
    r["ours_mixed/single"] = r["ours_mixed"] / r["ours_single"]
    r["peft_mixed/single"] = r["peft_mixed"] / r["peft_single"]
    r["ours_mixed/peft_mixed"] = r["ours_mixed"] / r["peft_mixed"]
    rows.append(r)
    print(f"pair {i}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in r.items()))
print("medians: " + ", ".join(f"{k} {med([r[k] for r in rows]):.3f}" for k in rows[0]))
print(f"(JSON in {out})")
PY
