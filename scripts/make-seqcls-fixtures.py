"""Makes tests/fixtures/{bert_cls,llama_cls}: tiny random BertForSequenceClassification and
LlamaForSequenceClassification models, a PEFT SEQ_CLS LoRA adapter on each (modules_to_save: the
head, added by PEFT; the head copy perturbed so that it differs from the base head), outputs,
merged checkpoints and one AdamW step on labels.

Run with the PEFT virtual environment: python scripts/make-seqcls-fixtures.py tests/fixtures
"""
import json
import os
import sys

import peft
import safetensors.torch as st
import torch
import transformers
from peft import LoraConfig, PeftModel, TaskType, get_peft_model
from transformers import (BertConfig, BertForSequenceClassification, LlamaConfig,
                          LlamaForSequenceClassification)

OUT = sys.argv[1] if len(sys.argv) > 1 else "tests/fixtures"


def make(name, base, lcfg, inputs, labels, extra):
    d = os.path.join(OUT, name)
    os.makedirs(d, exist_ok=True)
    base.eval()
    base.save_pretrained(f"{d}/base", safe_serialization=True)
    with torch.no_grad():
        base_logits = base(**inputs).logits
    model = get_peft_model(base, lcfg)
    # The head copy starts as the base head; move it so the saved copy is observable.
    torch.manual_seed(7)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "modules_to_save" in n:
                p.add_(torch.randn_like(p) * 0.1)
    model.eval()
    with torch.no_grad():
        lora_logits = model(**inputs).logits
    model.save_pretrained(f"{d}/adapter")
    # One AdamW step over the trainable parameters (LoRA factors and the head copy).
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    out = model(**inputs, labels=labels)
    out.loss.backward()
    io = {f"grad.{n}": p.grad.detach().clone() for n, p in params.items()}
    opt.step()
    io.update({f"after_step.{n}": p.detach().clone() for n, p in params.items()})
    io["train_loss"] = out.loss.detach().reshape(1)
    # Merged: reload base + adapter from disk.
    fresh = type(base).from_pretrained(f"{d}/base")
    merged = PeftModel.from_pretrained(fresh, f"{d}/adapter").merge_and_unload()
    merged.eval()
    with torch.no_grad():
        merged_logits = merged(**inputs).logits
    merged.save_pretrained(f"{d}/merged", safe_serialization=True)
    io.update({k: v.contiguous() for k, v in inputs.items()})
    io.update(labels=labels, base_logits=base_logits, lora_logits=lora_logits,
              merged_logits=merged_logits)
    st.save_file({k: v.contiguous() for k, v in io.items()}, f"{d}/io.safetensors")
    for p in ("base", "merged"):
        for f in ("generation_config.json",):
            if os.path.exists(f"{d}/{p}/{f}"):
                os.remove(f"{d}/{p}/{f}")
    os.remove(f"{d}/adapter/README.md")
    meta = dict(extra, torch=torch.__version__, peft=peft.__version__,
                transformers=transformers.__version__, script="scripts/make-seqcls-fixtures.py",
                lora_config={k: v for k, v in lcfg.to_dict().items()
                             if k in ("r", "lora_alpha", "target_modules", "task_type",
                                      "modules_to_save", "lora_dropout")},
                init_lora_weights=False,
                train_step="one AdamW(lr=1e-2, betas=(0.9,0.999), eps=1e-8, weight_decay=0) step on "
                           "model(**inputs, labels=labels).loss over LoRA factors and the head copy; "
                           "grad.<param name>, after_step.<param name>",
                note="logits in eval mode, float32; the head copy (modules_to_save) was moved by "
                     "0.1*N(0,1) after get_peft_model; merged/ is merge_and_unload() of the saved adapter")
    meta["lora_config"]["target_modules"] = sorted(meta["lora_config"]["target_modules"])
    with open(f"{d}/fixture.json", "w") as f:
        json.dump(meta, f, indent=2, default=list)


torch.manual_seed(0)
bert = BertForSequenceClassification(BertConfig(
    vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
    intermediate_size=128, max_position_embeddings=64, type_vocab_size=2, num_labels=3,
    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, classifier_dropout=0.0))
ids = torch.randint(1, 128, (3, 9))
mask = torch.ones_like(ids)
mask[1, 6:] = 0
mask[2, 3:] = 0
ids[mask == 0] = 0
tt = torch.zeros_like(ids)
tt[0, 5:] = 1
tt[1, 3:6] = 1
make("bert_cls", bert,
     LoraConfig(task_type=TaskType.SEQ_CLS, r=4, lora_alpha=8, target_modules=["query", "value"],
                lora_dropout=0.0, init_lora_weights=False),
     dict(input_ids=ids, attention_mask=mask, token_type_ids=tt), torch.tensor([2, 0, 1]),
     dict(model="tiny random BertForSequenceClassification (hidden 64, 2 layers, 4 heads, vocab 128, 3 labels)"))

torch.manual_seed(1)
llama = LlamaForSequenceClassification(LlamaConfig(
    vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, num_labels=3, pad_token_id=0,
    tie_word_embeddings=False))
ids = torch.randint(1, 128, (3, 10))
ids[1, 7:] = 0  # right padding
ids[2, 4:] = 0
make("llama_cls", llama,
     LoraConfig(task_type=TaskType.SEQ_CLS, r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                lora_dropout=0.0, init_lora_weights=False),
     dict(input_ids=ids), torch.tensor([1, 2, 0]),
     dict(model="tiny random LlamaForSequenceClassification (hidden 64, 2 layers, 4 heads, 2 kv heads, vocab 128, 3 labels, pad 0)"))
