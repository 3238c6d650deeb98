"""Makes the DoRA fixtures (tests/fixtures/dora_llama, tests/fixtures/dora_layers) with PEFT.

Run from the repository root with a Python that has torch, transformers, peft and safetensors:
    python scripts/make_dora_fixtures.py

dora_llama: the llama_qv base (tests/fixtures/llama_qv/base) with a DoRA adapter
  LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj","v_proj","down_proj"], use_dora=True,
  init_lora_weights=False, lora_dropout=0.0). With init_lora_weights=False PEFT sets m = ||W0 + s·B·A||
  row-wise, which makes the DoRA factor 1; the magnitudes are then scaled by (1 + 0.1·N(0,1)) so the
  factor is not 1 and the fixture tests it.
  io.safetensors: input_ids [2,12]; lora_logits (eval, unmerged); merged.<module>.weight for each
  adapted module (PeftModel.from_pretrained(...).merge_and_unload()); one AdamW step (lr 1e-2,
  betas (0.9,0.999), eps 1e-8, wd 0) on model(ids, labels=ids).loss over A, B and m:
  train_loss, grad.<param>, after_step.<param>.
dora_layers: a torch module with lin: Linear(16,8), conv: Conv2d(3,4,3,padding=1), emb: Embedding(10,6),
  all DoRA (r=2, lora_alpha=4, init_lora_weights=False, magnitudes perturbed the same way).
  base.safetensors (base state dict), adapter/ (save_pretrained), io.safetensors: x_lin [3,16],
  x_conv [2,3,5,5], ids [2,4] (i64); y_lin, y_conv, y_emb (eval, unmerged); merged.<m>.weight;
  grad.<param> of loss = sum(y_lin·w_lin) + sum(y_conv·w_conv) + sum(y_emb·w_emb) with fixed w_*.
"""
import json, os, sys
import torch
from torch import nn
import transformers, peft, safetensors
from safetensors.torch import load_file, save_file
from transformers import LlamaForCausalLM
from peft import LoraConfig, get_peft_model, PeftModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FX = os.path.join(ROOT, "tests", "fixtures")
VERSIONS = {"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__}


def perturb_magnitudes(model, gen):
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_magnitude_vector" in n:
                p.mul_(1 + 0.1 * torch.randn(p.shape, generator=gen))


def llama():
    out = os.path.join(FX, "dora_llama")
    base_dir = os.path.join(FX, "llama_qv", "base")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], use_dora=True,
                     init_lora_weights=False, lora_dropout=0.0, task_type="CAUSAL_LM")
    model = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32), cfg)
    perturb_magnitudes(model, gen)
    model.save_pretrained(os.path.join(out, "adapter"))
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    io = {"input_ids": ids}

    m = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                  os.path.join(out, "adapter")).eval()
    with torch.no_grad():
        io["lora_logits"] = m(ids).logits.float().contiguous()
    merged = m.merge_and_unload()
    for n, p in merged.named_parameters():
        if any(t in n for t in cfg.target_modules):
            io[f"merged.{n}"] = p.detach().clone().contiguous()

    m = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                                  os.path.join(out, "adapter"), is_trainable=True)
    m.train()
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}
    opt = torch.optim.AdamW(params.values(), lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
    loss = m(ids, labels=ids).loss
    loss.backward()
    io["train_loss"] = loss.detach().reshape(1)
    for n, p in params.items():
        io[f"grad.{n}"] = p.grad.detach().clone().contiguous()
    opt.step()
    for n, p in params.items():
        io[f"after_step.{n}"] = p.detach().clone().contiguous()
    save_file(io, os.path.join(out, "io.safetensors"))
    json.dump({"model": "llama_qv/base (tiny random LlamaForCausalLM)",
               "lora_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"],
                               "use_dora": True, "lora_dropout": 0.0},
               "init_lora_weights": False,
               "magnitudes": "PEFT's init (row norms of W0 + s·B·A), then scaled by 1 + 0.1·N(0,1), generator seed 1",
               "train_step": "one AdamW(lr=1e-2, betas=(0.9,0.999), eps=1e-8, weight_decay=0) step over A, B, m",
               "script": "scripts/make_dora_fixtures.py", **VERSIONS},
              open(os.path.join(out, "fixture.json"), "w"), indent=2)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(16, 8)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.emb = nn.Embedding(10, 6)

    def forward(self, x_lin, x_conv, ids):
        return self.lin(x_lin), self.conv(x_conv), self.emb(ids)


def layers():
    out = os.path.join(FX, "dora_layers")
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(2)
    base = Tiny()
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, os.path.join(out, "base.safetensors"))
    cfg = LoraConfig(r=2, lora_alpha=4, target_modules=["lin", "conv", "emb"], use_dora=True,
                     init_lora_weights=False, lora_dropout=0.0)
    model = get_peft_model(base, cfg)
    perturb_magnitudes(model, gen)
    model.save_pretrained(os.path.join(out, "adapter"))
    x_lin = torch.randn(3, 16, generator=gen)
    x_conv = torch.randn(2, 3, 5, 5, generator=gen)
    ids = torch.randint(0, 10, (2, 4), generator=gen)
    io = {"x_lin": x_lin, "x_conv": x_conv, "ids": ids}
    model.eval()
    y = model(x_lin, x_conv, ids)
    for name, t in zip(["y_lin", "y_conv", "y_emb"], y):
        io[name] = t.detach().contiguous()
    ws = [torch.randn(t.shape, generator=gen) for t in y]
    for name, w in zip(["w_lin", "w_conv", "w_emb"], ws):
        io[name] = w
    loss = sum((t * w).sum() for t, w in zip(y, ws))
    loss.backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            io[f"grad.{n}"] = p.grad.detach().clone().contiguous()
    fresh = Tiny()
    fresh.load_state_dict(load_file(os.path.join(out, "base.safetensors")))
    merged = PeftModel.from_pretrained(fresh, os.path.join(out, "adapter")).merge_and_unload()
    for n, p in merged.named_parameters():
        if n.endswith("weight"):
            io[f"merged.{n}"] = p.detach().clone().contiguous()
    save_file(io, os.path.join(out, "io.safetensors"))
    json.dump({"model": "Tiny: lin Linear(16,8), conv Conv2d(3,4,3,padding=1), emb Embedding(10,6)",
               "lora_config": {"r": 2, "lora_alpha": 4, "target_modules": ["lin", "conv", "emb"], "use_dora": True},
               "init_lora_weights": False,
               "magnitudes": "PEFT's init, then scaled by 1 + 0.1·N(0,1), generator seed 2",
               "script": "scripts/make_dora_fixtures.py", **VERSIONS},
              open(os.path.join(out, "fixture.json"), "w"), indent=2)


if __name__ == "__main__":
    llama()
    layers()
