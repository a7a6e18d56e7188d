#!/usr/bin/env python3
"""PyTorch / Hugging Face training-throughput baseline for phalanx (run by hand, NOT in CI).

    HF_HUB_OFFLINE=1 /work/venv-torch/bin/python scripts/bench_pytorch.py [--config configs/small.toml]
        [--steps 10] [--warmup 3] [--experts-impl default|eager|grouped_mm|batched_mm]
        [--attn-impl default|eager|sdpa]

(venv: `python3 -m venv /work/venv-torch && /work/venv-torch/bin/pip install torch transformers safetensors numpy`)

Builds transformers.DeepseekV3ForCausalLM from the top-level keys of the TOML config (they are
DeepseekV3Config keys; the [training] table is ignored; the HF model has no MTP module), fp32 on CPU,
torch.set_num_threads(2), AdamW(lr 1e-3, betas (0.9, 0.95), weight_decay 0.1), batch 8 x seq 128 random
tokens in [0, vocab).  Runs the warm-up steps, then times the training steps (forward, cross-entropy,
backward, clip_grad_norm 1.0, optimizer step).  The last line printed is `tokens_per_s=<value>`.
"""

import argparse
import time
import tomllib

import torch
import torch.nn.functional as F
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/small.toml")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--experts-impl", default="default")
    ap.add_argument("--attn-impl", default="default")
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    with open(args.config, "rb") as f:
        d = tomllib.load(f)
    d.pop("training", None)
    kw = {}
    if args.attn_impl != "default":
        kw["attn_implementation"] = args.attn_impl
    if args.experts_impl != "default":
        kw["experts_implementation"] = args.experts_impl
    cfg = transformers.DeepseekV3Config(**d, **kw)
    model = transformers.DeepseekV3ForCausalLM(cfg).to(torch.float32)
    model.train()

    n_params = sum(p.numel() for p in model.parameters())
    n_routed = sum(p.numel() for n, p in model.named_parameters() if ".mlp.experts." in n)
    n_active = n_params - n_routed + n_routed * cfg.num_experts_per_tok // cfg.n_routed_experts
    n_embed = model.model.embed_tokens.weight.numel()
    print(f"torch {torch.__version__}  transformers {transformers.__version__}  threads {torch.get_num_threads()}")
    print(f"attn_implementation={model.config._attn_implementation} "
          f"experts_implementation={model.config._experts_implementation}")
    print(f"params_total={n_params}  params_routed_experts={n_routed}  "
          f"params_active_per_token={n_active}  (embedding {n_embed}, no MTP)")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    V = cfg.vocab_size
    g = torch.Generator().manual_seed(0)

    def step():
        w = torch.randint(0, V, (args.batch, args.seq + 1), generator=g)
        logits = model(input_ids=w[:, :-1], use_cache=False).logits
        loss = F.cross_entropy(logits.reshape(-1, V).float(), w[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        return loss.item()

    for i in range(args.warmup):
        t0 = time.perf_counter()
        loss = step()
        print(f"warmup {i}: loss={loss:.4f} {time.perf_counter() - t0:.2f}s")
    times = []
    for i in range(args.steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
        print(f"step {i}: loss={loss:.4f} {times[-1]:.2f}s")
    total = sum(times)
    tokens = args.steps * args.batch * args.seq
    med = sorted(times)[len(times) // 2]
    print(f"steps={args.steps} tokens={tokens} seconds={total:.3f} mean_step_s={total / args.steps:.3f} "
          f"median_step_s={med:.3f} min_step_s={min(times):.3f}")
    print(f"tokens_per_s_median_step={args.batch * args.seq / med:.1f}  (less sensitive to other load on the machine)")
    print(f"tokens_per_s={tokens / total:.1f}")


if __name__ == "__main__":
    main()
