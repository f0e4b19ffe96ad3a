#!/usr/bin/env python3
"""PyTorch baseline for docs/perf.md: transformers WhisperEncoder (tiny.en, float32, eager attention, CPU) forward
throughput in seconds of audio per second, on the same input as crates/peft-core/examples/whisper_bench.rs
(log-mel of data/fsdd/recordings/7_theo_0.wav, i.e. reference/whisper_tiny_en_encoder input_features, repeated
B times). Best of --iters runs after one warm-up. Prints JSON lines.

    python3 benches/baselines/torch_whisper.py --batch 1,4 --iters 3 --threads 2
"""

import argparse
import json
import os
import time

import torch
from safetensors.torch import load_file
from transformers.models.whisper.modeling_whisper import WhisperEncoder


def assets_dir():
    env = os.environ.get("PEFT_ASSETS")
    if env:
        return env
    d = os.path.dirname(os.path.abspath(__file__))
    while d != "/":
        cand = os.path.join(d, "shared", "assets")
        if os.path.isdir(cand):
            return cand
        d = os.path.dirname(d)
    return "/work/shared/assets"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    root = assets_dir()
    enc = WhisperEncoder.from_pretrained(
        os.path.join(root, "models/whisper-tiny.en-encoder"), torch_dtype=torch.float32, attn_implementation="eager"
    ).eval()
    feats = load_file(os.path.join(root, "reference/whisper_tiny_en_encoder.safetensors"))["input_features"]
    for b in [int(x) for x in a.batch.split(",")]:
        x = feats[None].repeat(b, 1, 1).contiguous()
        best = float("inf")
        with torch.inference_mode():
            for _ in range(a.iters + 1):
                t = time.perf_counter()
                enc(x)
                best = min(best, time.perf_counter() - t)
        print(json.dumps({"impl": "torch", "threads": a.threads, "stage": "encoder", "batch": b,
                          "seconds": round(best, 4), "audio_s_per_s": round(30.0 * b / best, 2)}))


if __name__ == "__main__":
    main()
