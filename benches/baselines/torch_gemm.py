#!/usr/bin/env python3
"""PyTorch baseline for docs/perf.md: torch.matmul GFLOP/s and torch.linalg.svd seconds on CPU, 1 and 2 threads.

Same shapes, operand layouts and timing rule (best of >= 3 runs after one warm-up, >= --secs seconds per cell) as
crates/peft-core/examples/gemm_table.rs. Prints JSON lines; feed them to the table with

    python3 benches/baselines/torch_gemm.py > target/torch_gemm.json
    cargo run --release -p peft-core --example gemm_table -- --torch target/torch_gemm.json
"""

import argparse
import json
import time

import torch

RANKS = [8, 16, 32, 64]


def shapes():
    """(name, m, k, n, lhs_t, rhs_t): a transposed operand is stored row-major the other way round and viewed .t()."""
    out = [(f"square_{s}", s, s, s, False, False) for s in (512, 1024, 2048)]
    out += [(f"x_At_r{r}", 4096, 4096, r, False, True) for r in RANKS]  # x @ A.t(), A is [r, in]
    out += [(f"dht_x_r{r}", r, 4096, 4096, True, False) for r in RANKS]  # dh.t() @ x, dh is [tokens, r]
    out.append(("merge_B_A_r16", 4096, 16, 4096, False, False))  # B @ A
    # BERT-base, 512 tokens: linear 768->768 and 768->3072 (x @ W.t()), dW = dy.t() @ x, one head's q @ k.t()
    out += [
        ("bert_qkv", 512, 768, 768, False, True),
        ("bert_ffn_up", 512, 768, 3072, False, True),
        ("bert_dW", 768, 512, 768, True, False),
        ("bert_attn_qk", 128, 64, 128, False, True),
    ]
    return out


def best_seconds(fn, secs):
    fn()
    runs = []
    start = time.perf_counter()
    while len(runs) < 3 or (time.perf_counter() - start < secs and len(runs) < 500):
        t = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - t)
    return min(runs)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--secs", type=float, default=1.0, help="minimum timed seconds per cell")
    args = ap.parse_args()
    torch.manual_seed(0)
    meta = f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, " + (
        "MKL" if torch.backends.mkl.is_available() else "no MKL"
    )
    print(json.dumps({"kind": "meta", "torch": meta}), flush=True)
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, m, k, n, lhs_t, rhs_t in shapes():
            a = torch.rand(k, m).t() if lhs_t else torch.rand(m, k)
            b = torch.rand(n, k).t() if rhs_t else torch.rand(k, n)
            out = torch.empty(m, n)
            s = best_seconds(lambda: torch.matmul(a, b, out=out), args.secs)
            rec = {"kind": "gemm", "name": name, "threads": threads, "gflops": 2 * m * n * k / s * 1e-9}
            print(json.dumps(rec), flush=True)
        for m, n in ((768, 768), (384, 1536)):
            a = torch.rand(m, n) * 2 - 1
            s = best_seconds(lambda: torch.linalg.svd(a, full_matrices=False), args.secs)
            print(json.dumps({"kind": "svd", "name": f"{m}x{n}", "threads": threads, "seconds": s}), flush=True)


if __name__ == "__main__":
    main()
