#!/usr/bin/env python3
"""The fusion head (docs/DESIGN.md section 2) in plain PyTorch, timed the way a user would run it.

Standalone: needs only torch. Prints one JSON object per (impl, batch, dtype):

  impl            torch-eager, or torch-compile (torch.compile of the same module)
  ms_per_batch    forward only, inputs already on the device (median)
  samples_per_s   throughput: batch / mean batch time (as `fusion-engine bench` reports it)
  proj_ms_per_batch  the M projections alone (F.linear without bias; cuBLAS on CUDA)
  e2e_ms_per_batch   host inputs -> device -> forward -> host outputs (pageable host memory,
                     what `fusion-engine bench` measures for its own backends); CUDA only
  e2e_pinned_ms_per_batch  the same from pinned host memory with non_blocking copies; CUDA only
  *_samples_per_s    throughputs of the above (batch / mean time); *_median_samples_per_s
                     batch / median time

With --copy-ceiling it prints host<->device copy throughput instead (pinned and pageable, GB/s),
the ceiling the engine's overlapped copies are compared against.

Half-precision runs cast the module and the inputs to that dtype (what a user serving an f16
head does) and return float32 outputs, like fusion-engine.

usage: torch_head.py [--device cuda|cpu] [--batch 64,1024,8192] [--dtype f32,f16]
                     [--iters 50] [--warmup 5] [--compile eager|compile|both] [--copy-ceiling]
"""
import argparse
import copy
import json
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

# The embedded default head of fusion-engine (src/model.rs).
DIMS = {"vision": 1024, "text": 768, "audio": 128}
D = 512
EPS = 1e-5
DTYPES = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}


class AttnFusion(nn.Module):
    """docs/DESIGN.md section 2, as a user trains it."""

    def __init__(self, dims, d, eps=EPS):
        super().__init__()
        self.proj = nn.ModuleDict({m: nn.Linear(w, d) for m, w in dims.items()})
        self.gate = nn.Linear(d, 1, bias=False)
        self.norm = nn.LayerNorm(d, eps=eps)

    def forward(self, xs, mask):
        h = torch.stack([self.proj[m](x) for m, x in xs.items()], 1)  # [B, M, D]
        s = self.gate(torch.tanh(h)).squeeze(-1)  # [B, M]
        s = s.masked_fill(~mask, float("-inf"))
        a = torch.softmax(s, dim=1)
        z = (a.unsqueeze(-1) * h).sum(1)
        return self.norm(z), a


def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def times_ms(fn, dev, iters, warmup):
    """(median, mean) milliseconds per call after warm-up."""
    for _ in range(warmup):
        fn()
    sync(dev)
    ts = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        sync(dev)
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts), statistics.fmean(ts)


def median_ms(fn, dev, iters, warmup):
    return times_ms(fn, dev, iters, warmup)[0]


def record(res, key, b, times):
    med, mean = times
    res[f"{key}ms_per_batch"] = med
    res[f"{key}samples_per_s"] = b / (mean / 1e3)
    res[f"{key}median_samples_per_s"] = b / (med / 1e3)


def bench(impl, model, dev, b, dtname, iters, warmup):
    dt = DTYPES[dtname]
    g = torch.Generator().manual_seed(b)
    host = {m: torch.randn(b, w, generator=g).to(dt) for m, w in DIMS.items()}
    host_mask = torch.ones(b, len(DIMS), dtype=torch.bool)
    xs = {m: x.to(dev) for m, x in host.items()}
    mask = host_mask.to(dev)
    res = {"impl": impl, "device": str(dev), "batch": b, "dtype": dtname, "iters": iters}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    with torch.inference_mode():

        def fwd():
            return model(xs, mask)

        record(res, "", b, times_ms(fwd, dev, iters, warmup))

        def proj():
            return [F.linear(x, model.proj[m].weight) for m, x in xs.items()]

        res["proj_ms_per_batch"] = median_ms(proj, dev, iters, warmup)
        if dev.type == "cuda":

            def e2e():
                y, a = model({m: x.to(dev) for m, x in host.items()}, host_mask.to(dev))
                return y.float().cpu(), a.float().cpu()

            record(res, "e2e_", b, times_ms(e2e, dev, iters, warmup))
            pinned = {m: x.pin_memory() for m, x in host.items()}
            pmask = host_mask.pin_memory()
            out_y = torch.empty(b, D, dtype=torch.float32).pin_memory()
            out_a = torch.empty(b, len(DIMS), dtype=torch.float32).pin_memory()

            def e2e_pinned():
                y, a = model(
                    {m: x.to(dev, non_blocking=True) for m, x in pinned.items()},
                    pmask.to(dev, non_blocking=True),
                )
                out_y.copy_(y.float(), non_blocking=True)
                out_a.copy_(a.float(), non_blocking=True)

            record(res, "e2e_pinned_", b, times_ms(e2e_pinned, dev, iters, warmup))
    return res


def copy_ceiling(dev, mib=256, iters=10):
    n = mib << 20
    out = {"impl": "copy-ceiling", "device": str(dev), "bytes": n}
    if dev.type == "cuda":
        out["gpu"] = torch.cuda.get_device_name(dev)
    d = torch.empty(n, dtype=torch.uint8, device=dev)
    for kind in ("pinned", "pageable"):
        h = torch.empty(n, dtype=torch.uint8)
        if kind == "pinned":
            h = h.pin_memory()
        h.fill_(1)
        ms = median_ms(lambda: d.copy_(h, non_blocking=(kind == "pinned")), dev, iters, 2)
        out[f"h2d_{kind}_gbps"] = n / (ms / 1e3) / 1e9
        ms = median_ms(lambda: h.copy_(d, non_blocking=(kind == "pinned")), dev, iters, 2)
        out[f"d2h_{kind}_gbps"] = n / (ms / 1e3) / 1e9
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--batch", default="64,1024,8192")
    ap.add_argument("--dtype", default="f32,f16")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--compile", default="eager", choices=["eager", "compile", "both"])
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (default: torch's)")
    ap.add_argument("--copy-ceiling", action="store_true")
    a = ap.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    if a.device == "cuda" and not torch.cuda.is_available():
        print(json.dumps({"error": "torch sees no CUDA device"}))
        return 1
    dev = torch.device(a.device)
    if a.copy_ceiling:
        print(json.dumps(copy_ceiling(dev)), flush=True)
        return 0
    # docs/DESIGN.md section 2.4 (tolerances): no TF32 for f32 (fusion-engine's default), so compare like with like.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    base = AttnFusion(DIMS, D).eval()
    impls = ["eager", "compile"] if a.compile == "both" else [a.compile]
    for dtname in a.dtype.split(","):
        model = copy.deepcopy(base).to(device=dev, dtype=DTYPES[dtname])
        for impl in impls:
            m = model
            if impl == "compile":
                try:
                    m = torch.compile(model)
                except Exception as e:  # noqa: BLE001 - report and go on
                    print(json.dumps({"impl": "torch-compile", "dtype": dtname, "error": str(e)}))
                    continue
            for b in [int(v) for v in a.batch.split(",")]:
                try:
                    r = bench(f"torch-{impl}", m, dev, b, dtname, a.iters, a.warmup)
                except Exception as e:  # noqa: BLE001 - torch.compile may fail at first call
                    r = {"impl": f"torch-{impl}", "batch": b, "dtype": dtname, "error": str(e)[:500]}
                print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
