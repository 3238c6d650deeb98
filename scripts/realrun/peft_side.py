"""The real run's base classifier and its PyTorch + PEFT side.

    python scripts/realrun/peft_side.py make-base MINILM_DIR BASE_DIR
        BertForSequenceClassification from all-MiniLM-L6-v2, num_labels 2, torch.manual_seed(0)
        for the new head (normal std 0.02, bias 0); tokenizer files copied. Both sides start here.
    python scripts/realrun/peft_side.py train MODE BASE_DIR DATA_DIR OUT_JSON LR EPOCHS
        MODE: probe (head only), lora (r 8, alpha 16, query/key/value/dense, SEQ_CLS), full.
        Same recipe as `lora train`: batch 16, AdamW (weight decay 0), linear decay, no warmup,
        grad-norm clip 1.0, seed 0, no dropout (eval-mode model: lora trains without dropout).
"""
import json
import resource
import shutil
import sys
import time

import torch
from transformers import AutoTokenizer, BertForSequenceClassification

torch.set_num_threads(2)


def make_base(minilm, base):
    torch.manual_seed(0)
    m = BertForSequenceClassification.from_pretrained(minilm, num_labels=2)
    m.save_pretrained(base, safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt"):
        try:
            shutil.copy(f"{minilm}/{f}", f"{base}/{f}")
        except FileNotFoundError:
            pass


def read(path):
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def batches(tok, rows, bs, order):
    for i in range(0, len(order), bs):
        chunk = [rows[j] for j in order[i:i + bs]]
        enc = tok([r["text"] for r in chunk], padding=True, truncation=True, max_length=512,
                  return_tensors="pt")
        yield enc, torch.tensor([r["label"] for r in chunk])


def train(mode, base, data, out, lr, epochs):
    from peft import LoraConfig, TaskType, get_peft_model
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(base)
    model = BertForSequenceClassification.from_pretrained(base)
    # No dropout anywhere, as `lora train` (it applies only the adapters' dropout).
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout):
            mod.p = 0.0
    if mode == "lora":
        model = get_peft_model(model, LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16,
                                                 lora_dropout=0.0,
                                                 target_modules=["query", "key", "value", "dense"]))
    elif mode == "probe":
        for n, p in model.named_parameters():
            p.requires_grad = n.startswith("classifier.")
    params = [p for p in model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    tr, ev = read(f"{data}/train.jsonl"), read(f"{data}/eval.jsonl")
    bs = 16
    total = epochs * ((len(tr) + bs - 1) // bs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: max(0.0, 1 - s / total))
    g = torch.Generator().manual_seed(0)
    t0 = time.time()
    model.train()
    losses = []
    for _ in range(epochs):
        order = torch.randperm(len(tr), generator=g).tolist()
        s = 0.0
        for enc, labels in batches(tok, tr, bs, order):
            loss = model(**enc, labels=labels).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            opt.zero_grad()
            s += loss.item()
        losses.append(s / ((len(tr) + bs - 1) // bs))
    secs = time.time() - t0
    model.eval()
    right = 0
    with torch.no_grad():
        for enc, labels in batches(tok, ev, 64, list(range(len(ev)))):
            right += (model(**enc).logits.argmax(-1) == labels).sum().item()
    res = dict(mode=mode, accuracy=right / len(ev), train_seconds=secs, trainable_params=n_params,
               epoch_losses=losses, peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
               torch=torch.__version__)
    json.dump(res, open(out, "w"), indent=2)
    print(json.dumps(res))


if sys.argv[1] == "make-base":
    make_base(sys.argv[2], sys.argv[3])
else:
    train(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6]), int(sys.argv[7]))
