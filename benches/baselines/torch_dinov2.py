#!/usr/bin/env python3
"""PyTorch baseline for docs/perf.md: transformers Dinov2Model forward throughput (images/s) on CPU, f32.

Same weights (models/dinov2-small, F16 upcast), batch, 224x224 random pixels and timing rule (best of >= 3 timed
runs after one warm-up, >= --secs seconds) as crates/peft-core/examples/dinov2_throughput.rs. Prints JSON lines:

    python3 benches/baselines/torch_dinov2.py --threads 1 --batch 8
    cargo run --release -p peft-core --example dinov2_throughput -- 1 8
"""

import argparse
import json
import os
import time

import torch
from transformers import Dinov2Model


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--secs", type=float, default=3.0)
    ap.add_argument("--attn", default="sdpa", choices=["sdpa", "eager"])
    ap.add_argument("--model", default=os.path.join(os.environ.get("PEFT_ASSETS", "/work/shared/assets"),
                                                     "models/dinov2-small"))
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    model = Dinov2Model.from_pretrained(a.model, dtype=torch.float32, attn_implementation=a.attn).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(a.batch, 3, 224, 224, generator=g) * 4 - 2
    with torch.inference_mode():
        model(pixel_values=x)
        best, runs, start = float("inf"), 0, time.perf_counter()
        while runs < 3 or (time.perf_counter() - start < a.secs and runs < 100):
            t = time.perf_counter()
            model(pixel_values=x)
            best = min(best, time.perf_counter() - t)
            runs += 1
    print(json.dumps({"impl": f"torch-{a.attn}", "threads": a.threads, "batch": a.batch, "runs": runs,
                      "best_s": round(best, 4), "images_per_s": round(a.batch / best, 2)}))


if __name__ == "__main__":
    main()
