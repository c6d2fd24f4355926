#!/usr/bin/env python3
"""CPU comparison: fusion-engine's CPU backend vs the same head in PyTorch on the CPU.

Runs the two alternately, ROUNDS times, in one invocation on this machine, and prints the
median samples/s of each and their ratio (one JSON object). PyTorch uses every core
(torch.set_num_threads(nproc)), inference_mode, and F.linear / tanh / softmax / layer_norm:
the way a user writes the head. Also times PyTorch's three projections alone.

usage: scripts/compare_cpu.py [--batch 1024] [--rounds 5] [--iters 30] [--binary PATH]
"""
import argparse
import json
import os
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

DIMS = {"vision": 1024, "text": 768, "audio": 128}
D = 512


def torch_head(xs, mask, p):
    hs = torch.stack([F.linear(x, p[f"proj.{m}.weight"], p[f"proj.{m}.bias"]) for m, x in xs.items()], 1)
    s = (torch.tanh(hs) @ p["gate.weight"].t()).squeeze(-1)
    s = s.masked_fill(~mask, float("-inf"))
    a = torch.softmax(s, dim=1)
    z = (a.unsqueeze(-1) * hs).sum(1)
    return F.layer_norm(z, (D,), p["norm.weight"], p["norm.bias"], 1e-5), a


def torch_proj(xs, p):
    return [F.linear(x, p[f"proj.{m}.weight"]) for m, x in xs.items()]


def time_torch(fn, iters, warmup=5):
    """Seconds per call over `iters` back-to-back calls: throughput, as `fusion-engine bench`
    reports its samples/s (the median, a latency, is its `ms_per_batch`)."""
    for _ in range(warmup):
        fn()
    t = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=1024)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--binary", default="target/release/fusion-engine")
    a = ap.parse_args()
    torch.set_num_threads(os.cpu_count())
    g = torch.Generator().manual_seed(0)
    p = {}
    for m, d in DIMS.items():
        p[f"proj.{m}.weight"] = torch.randn(D, d, generator=g) / d**0.5
        p[f"proj.{m}.bias"] = torch.randn(D, generator=g) * 0.01
    p["gate.weight"] = torch.randn(1, D, generator=g) / D**0.5
    p["norm.weight"] = torch.ones(D)
    p["norm.bias"] = torch.zeros(D)
    xs = {m: torch.randn(a.batch, d, generator=g) for m, d in DIMS.items()}
    mask = torch.ones(a.batch, len(DIMS), dtype=torch.bool)
    flops = 2 * a.batch * D * sum(DIMS.values())
    fe, fe_med, th, tp, fe_proj = [], [], [], [], []
    for _ in range(a.rounds):
        with torch.inference_mode():
            th.append(a.batch / time_torch(lambda: torch_head(xs, mask, p), a.iters))
            tp.append(a.batch / time_torch(lambda: torch_proj(xs, p), a.iters))
        out = subprocess.run(
            [a.binary, "bench", "--backend", "cpu", "--batch", str(a.batch), "--iters", str(a.iters), "--json"],
            check=True, capture_output=True, text=True,
        ).stdout
        r = json.loads(out.strip().splitlines()[-1])
        fe.append(r["samples_per_s"])
        fe_med.append(r["median_samples_per_s"])
        fe_proj.append(a.batch / (r["proj_ms_per_batch"] / 1e3))
    res = {
        "batch": a.batch,
        "rounds": a.rounds,
        "threads": os.cpu_count(),
        "torch_version": torch.__version__,
        "fusion_engine_samples_per_s": statistics.median(fe),
        "fusion_engine_gflops": statistics.median(fe) * flops / a.batch / 1e9,
        "fusion_engine_proj_only_gflops": statistics.median(fe_proj) * flops / a.batch / 1e9,
        "fusion_engine_head_over_proj": statistics.median(fe_proj) / statistics.median(fe_med),
        "torch_samples_per_s": statistics.median(th),
        "torch_gflops": statistics.median(th) * flops / a.batch / 1e9,
        "torch_proj_only_gflops": statistics.median(tp) * flops / a.batch / 1e9,
        "speedup_vs_torch": statistics.median(fe) / statistics.median(th),
    }
    print(json.dumps(res))


if __name__ == "__main__":
    main()
