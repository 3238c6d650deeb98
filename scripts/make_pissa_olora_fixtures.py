"""Makes tests/fixtures/pissa_olora with PEFT: PiSSA and OLoRA on the llama_qv base.

Run from the repository root with a Python that has torch, transformers, peft and safetensors:
    python scripts/make_pissa_olora_fixtures.py

For each method in ("pissa", "olora"):
  get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj","v_proj"],
                 init_lora_weights=method, lora_dropout=0.0, task_type="CAUSAL_LM"))
  io.safetensors, keys prefixed "<method>.":
    init.<module>.lora_A / lora_B   the initial factors PEFT computed (SVD / QR, signs as LAPACK's)
    residual.<module>.weight        the rewritten base weight W - s·B0·A0
    converted_logits                after one AdamW step (lr 1e-2, betas (0.9, 0.999), eps 1e-8,
                                    wd 0) on model(ids, labels=ids).loss, the adapter saved with
                                    path_initial_model_for_weight_conversion (a rank-8 plain LoRA)
                                    and loaded on the original base: its logits (eval)
  plus input_ids [2, 12] (shared).
"""
import json, os, tempfile
import torch
import transformers, peft
from safetensors.torch import save_file
from transformers import LlamaForCausalLM
from peft import LoraConfig, get_peft_model, PeftModel

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FX = os.path.join(ROOT, "tests", "fixtures")
BASE = os.path.join(FX, "llama_qv", "base")
OUT = os.path.join(FX, "pissa_olora")


def load():
    return LlamaForCausalLM.from_pretrained(BASE, dtype=torch.float32)


def main():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, 128, (2, 12), generator=gen)
    io = {"input_ids": ids}
    for method in ["pissa", "olora"]:
        torch.manual_seed(0)
        cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=method,
                         lora_dropout=0.0, task_type="CAUSAL_LM")
        model = get_peft_model(load(), cfg)
        for n, p in model.named_parameters():
            if "lora_A" in n or "lora_B" in n:
                module = n.removeprefix("base_model.model.").replace(".default.weight", "")
                io[f"{method}.init.{module}"] = p.detach().clone().contiguous()
            if "base_layer.weight" in n:
                module = n.removeprefix("base_model.model.").replace(".base_layer.weight", "")
                io[f"{method}.residual.{module}.weight"] = p.detach().clone().contiguous()
        with tempfile.TemporaryDirectory() as tmp:
            init_dir = os.path.join(tmp, "initial")
            model.peft_config["default"].init_lora_weights = True
            model.save_pretrained(init_dir)
            model.peft_config["default"].init_lora_weights = method
            model.train()
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0)
            model(ids, labels=ids).loss.backward()
            opt.step()
            conv_dir = os.path.join(tmp, "converted")
            model.save_pretrained(conv_dir, path_initial_model_for_weight_conversion=init_dir)
            conv = PeftModel.from_pretrained(load(), conv_dir).eval()
            with torch.no_grad():
                io[f"{method}.converted_logits"] = conv(ids).logits.float().contiguous()
    save_file(io, os.path.join(OUT, "io.safetensors"))
    json.dump({"model": "llama_qv/base (tiny random LlamaForCausalLM)",
               "lora_config": {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
               "init_lora_weights": ["pissa", "olora"],
               "train_step": "one AdamW(lr=1e-2, betas=(0.9,0.999), eps=1e-8, weight_decay=0) step, then "
                             "save_pretrained(path_initial_model_for_weight_conversion=...)",
               "script": "scripts/make_pissa_olora_fixtures.py",
               "torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__},
              open(os.path.join(OUT, "fixture.json"), "w"), indent=2)


if __name__ == "__main__":
    main()
