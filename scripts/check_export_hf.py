#!/usr/bin/env python3
"""Checks `phalanx ckpt export-hf` against Hugging Face transformers (run by hand, NOT in CI).

    python3 scripts/check_export_hf.py DIR TOKENS.u32 [--seq-len 128]

Loads DIR with `DeepseekV3ForCausalLM.from_pretrained(DIR, output_loading_info=True)` in fp32,
prints the missing and unexpected keys (both must be empty), then the mean main-head
cross-entropy over the little-endian u32 token file cut as `phalanx eval` cuts it: windows of
seq-len + 1 tokens from the start, the last partial window dropped, every window one sequence.
The last line is `loss=<value>`, to compare with `phalanx eval --store URL --data TOKENS.u32`.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
import transformers


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("tokens")
    ap.add_argument("--seq-len", type=int, default=128)
    a = ap.parse_args()
    torch.set_num_threads(2)
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(
        a.dir, output_loading_info=True, torch_dtype=torch.float32
    )
    model.eval()
    print(f"transformers {transformers.__version__}, torch {torch.__version__}")
    print(f"missing keys: {sorted(info['missing_keys'])}")
    print(f"unexpected keys: {sorted(info['unexpected_keys'])}")
    ids = np.fromfile(a.tokens, dtype="<u4").astype(np.int64)
    w = a.seq_len + 1
    n = len(ids) // w
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(n):
            win = torch.from_numpy(ids[i * w : (i + 1) * w]).unsqueeze(0)
            logits = model(win[:, :-1]).logits.float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), win[:, 1:].reshape(-1), reduction="sum")
            total += loss.item()
            count += a.seq_len
    print(f"windows={n} seq_len={a.seq_len}")
    print(f"loss={total / count:.6f}")


if __name__ == "__main__":
    main()
