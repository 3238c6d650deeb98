"""PyTorch + PEFT side of `lora bench --serving`: mixed-adapter generation with PEFT's
`adapter_names` (one batch, a Python loop over the adapters in every LoRA layer) against the same
batch for one adapter, on the baseline's small Llama (CPU, float32).

    /work/peft-venv/bin/python scripts/peft_serving.py [--threads 2] [--runs 3] [--json out.json]

Same shapes as ours: vocab 4096, hidden 512, intermediate 1408, 4 layers, 8 heads; 8 random
rank-8 adapters (alpha 16, init_lora_weights=False) on every decoder linear; 16 requests of 32
prompt tokens, 64 new tokens each, greedy, no early stop. `single`: all 16 rows on adapter a0
(`set_adapter`, PEFT's plain path); `mixed`: two rows per adapter through `adapter_names`. The two
alternate run by run; medians are printed. Tokens/s counts new tokens over the whole
`generate` call (prefill included), as ours does.
"""
import argparse, json, time
import torch, transformers
from peft import LoraConfig, get_peft_model

p = argparse.ArgumentParser()
p.add_argument("--threads", type=int, default=2)
p.add_argument("--runs", type=int, default=3)
p.add_argument("--json")
a = p.parse_args()
torch.set_num_threads(a.threads)
torch.manual_seed(0)

SEQS, PROMPT, NEW, ADAPTERS = 16, 32, 64, 8
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
cfg = transformers.LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=4,
                               num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512,
                               tie_word_embeddings=False)
model = transformers.LlamaForCausalLM(cfg)
lc = lambda: LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS, init_lora_weights=False)
model = get_peft_model(model, lc(), adapter_name="a0")
for i in range(1, ADAPTERS):
    model.add_adapter(f"a{i}", lc())
model.eval()
ids = torch.tensor([[(i * 131 + j * 17) % cfg.vocab_size for j in range(PROMPT)] for i in range(SEQS)])
attn = torch.ones_like(ids)
gen = dict(max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False, pad_token_id=0, eos_token_id=None)

def run(names):
    t = time.perf_counter()
    with torch.no_grad():
        if names is None:
            model.set_adapter("a0")
            out = model.generate(input_ids=ids, attention_mask=attn, **gen)
        else:
            out = model.generate(input_ids=ids, attention_mask=attn, adapter_names=names, **gen)
    dt = time.perf_counter() - t
    assert out.shape == (SEQS, PROMPT + NEW), out.shape
    return SEQS * NEW / dt

mixed_names = [f"a{i % ADAPTERS}" for i in range(SEQS)]
run(None)  # warm-up
single, mixed = [], []
for _ in range(a.runs):
    single.append(run(None))
    mixed.append(run(mixed_names))
med = lambda v: sorted(v)[len(v) // 2]
res = {"torch": torch.__version__, "threads": a.threads,
       "peft_serve_single_adapter_tokens_per_s": med(single),
       "peft_serve_mixed_8_adapters_tokens_per_s": med(mixed),
       "peft_serve_mixed_over_single": med(mixed) / med(single)}
for k, v in res.items(): print(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}")
if a.json: json.dump(res, open(a.json, "w"), indent=2)
