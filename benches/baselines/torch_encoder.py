#!/usr/bin/env python3
"""PyTorch baseline for crates/peft-core/benches/encoder_step.rs (docs/perf.md, "Encoder step").

(a) one training step (forward + backward) of a BERT encoder layer (batch 32, seq 128, hidden 384, 12 heads,
    FFN 1536, exact GELU, post-LN) with frozen weights, a trainable input and a trainable 2-class head on the
    mean-pooled output; (b) MiniLM-L6 (all-MiniLM-L6-v2 shapes, random weights) forward, batch 32 x seq 128.
Uses transformers' BertLayer / BertModel (eager attention) with dropout off. Timing: best of >= 3 runs after one
warm-up, >= --secs seconds per cell. Prints one JSON line per (case, threads).

    python3 benches/baselines/torch_encoder.py --threads 2
"""

import argparse
import json
import time

import torch
from transformers import BertConfig, BertModel
from transformers.models.bert.modeling_bert import BertLayer

B, L, H = 32, 128, 384


def best_seconds(fn, secs):
    fn()
    runs = []
    start = time.perf_counter()
    while len(runs) < 3 or (time.perf_counter() - start < secs and len(runs) < 200):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return min(runs)


def config():
    return BertConfig(vocab_size=30522, hidden_size=H, num_hidden_layers=6, num_attention_heads=12,
                      intermediate_size=1536, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                      attn_implementation="eager")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, nargs="+", default=[2])
    ap.add_argument("--secs", type=float, default=3.0)
    args = ap.parse_args()
    torch.manual_seed(0)
    cfg = config()
    layer = BertLayer(cfg).eval()
    for p in layer.parameters():
        p.requires_grad_(False)
    x = torch.rand(B, L, H) * 2 - 1
    x.requires_grad_(True)
    head = (torch.rand(2, H) * 0.04 - 0.02).requires_grad_(True)
    labels = torch.arange(B) % 2

    def step():
        out = layer(x)
        h = out[0] if isinstance(out, tuple) else out
        loss = torch.nn.functional.cross_entropy(h.mean(1) @ head.t(), labels)
        loss.backward()
        x.grad = None
        head.grad = None

    model = BertModel(cfg, add_pooling_layer=False).eval()
    ids = torch.randint(1000, 30000, (B, L))
    mask = torch.ones(B, L, dtype=torch.long)

    def forward():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask)

    for t in args.threads:
        torch.set_num_threads(t)
        s = best_seconds(step, args.secs)
        print(json.dumps({"case": "encoder_layer_train_step", "threads": t, "seconds": s, "tokens_per_s": B * L / s}))
        s = best_seconds(forward, args.secs)
        print(json.dumps({"case": "minilm_forward", "threads": t, "seconds": s, "tokens_per_s": B * L / s}))


if __name__ == "__main__":
    main()
