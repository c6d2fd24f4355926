#!/usr/bin/env python3
"""One line of where a batch's time goes, from a running server's /metrics (docs/DESIGN.md 8).

    metrics_breakdown.py HOST:PORT

Prints the mean batch size, each device's batch time (its worker's run: copies and kernels)
and, for backends that time their stages (CUDA, wgpu), where a run went (GPU time of the
kernels and copies, the host's staging, waiting and draining) and how much was copied directly,
the engine's batch time (submitted to done: the engine's queues plus the device), the writers'
send time, the page locks and unlocks of batch and output buffers (docs/DESIGN.md 6.7: how
many, how long), and the engine's pending batches now. Used by scripts/serve-device-check.sh after
each run, before the server stops."""
import re, sys, urllib.request

text = urllib.request.urlopen(f"http://{sys.argv[1]}/metrics", timeout=5).read().decode()
vals = {}
for line in text.splitlines():
    m = re.match(r'^([a-z_]+)(\{[^}]*\})?\s+(\S+)$', line)
    if m:
        vals[(m.group(1), m.group(2) or "")] = float(m.group(3))


def mean(name, labels=""):
    s, c = vals.get((name + "_sum", labels)), vals.get((name + "_count", labels))
    return None if not c else s / c


def q(name, quant, labels=""):
    inner = labels[1:-1] + "," if labels else ""
    return vals.get((name, "{" + inner + f'quantile="{quant}"' + "}"))


def ms(v):
    return "-" if v is None else f"{v * 1e3:.2f}"


parts = []
b = mean("fusion_server_batch_size")
parts.append(f"batch size mean {b:.0f}" if b else "batch size -")
for (n, labels) in sorted(vals):
    if n == "fusion_device_batch_seconds_count":
        dev = re.search(r'device="([^"]+)"', labels).group(1)
        parts.append(f"{dev} run ms mean {ms(mean('fusion_device_batch_seconds', labels))} "
                     f"p50 {ms(q('fusion_device_batch_seconds', '0.5', labels))} (n {vals[(n, labels)]:.0f})")
        # Where the run went (backends that time their stages): means over the runs.
        runs = vals[(n, labels)]
        stages = []
        for st in ("kernels", "h2d", "d2h", "host_stage", "host_wait", "host_drain"):
            sl = '{device="%s",stage="%s"}' % (dev, st)
            total = vals.get(("fusion_device_stage_seconds_sum", sl))
            if total and runs:
                stages.append(f"{st} {total / runs * 1e3:.3f}")
        if stages:
            host = sum(vals.get(("fusion_device_stage_seconds_sum", '{device="%s",stage="%s"}' % (dev, st)), 0.0)
                       for st in ("host_stage", "host_wait", "host_drain"))
            run = mean('fusion_device_batch_seconds', labels)
            if run is not None and runs:
                # The rest of the worker's run: issuing copies and launches, the output buffers.
                stages.append(f"host other {(run - host / runs) * 1e3:.3f}")
            parts.append(f"{dev} per run ms: " + ", ".join(stages))
        copied = {}
        for d in ("h2d", "d2h"):
            for direct in ("yes", "no"):
                sl = '{device="%s",direction="%s",direct="%s"}' % (dev, d, direct)
                copied[(d, direct)] = vals.get(("fusion_device_copied_bytes_total", sl), 0.0)
        for d in ("h2d", "d2h"):
            all_ = copied[(d, "yes")] + copied[(d, "no")]
            if all_:
                parts.append(f"{dev} {d} {all_ / max(runs, 1) / 1e6:.2f} MB a run, "
                             f"{copied[(d, 'yes')] / all_ * 100:.0f}% direct")
parts.append(f"engine submit-to-done ms mean {ms(mean('fusion_engine_batch_seconds'))} "
             f"p50 {ms(q('fusion_engine_batch_seconds', '0.5'))}")
for what in ("lock", "unlock"):
    n = vals.get((f"fusion_engine_page_{what}_seconds_count", ""))
    if n:
        parts.append(f"page {what}s {n:.0f} (ms mean {ms(mean(f'fusion_engine_page_{what}_seconds'))})")
parts.append(f"send ms mean {ms(mean('fusion_server_send_seconds'))}")
parts.append(f"pending batches now {vals.get(('fusion_engine_pending_batches', ''), 0):.0f}")
print("  metrics: " + "; ".join(parts))
