#!/usr/bin/env bash
# The main job end to end on each device (issue 18): `serve --devices SPEC` with the embedded
# default head, driven by `loadgen --url` from another process, one run per device spec, and
# one table: samples/s carried, the server's CPU per sample, p50/p99 latency, GPU utilisation.
# Run by scripts/gpu-check.sh after its head table (SERVE_CHECK=1, the default), or alone:
#
#   scripts/serve-device-check.sh [BINARY]   (default: target/release/fusion-engine)
#   env: DEVICES ("cuda:0 cuda:0:instances=2 cpu wgpu:0": one run each; a spec whose device
#        is missing is reported as such; the goal line takes the best CUDA row), SECS (10 per
#        run), PRODUCERS (8: each its own stream), RATE
#        (4000000 samples/s offered in all: more than any device carries, so the figure is
#        what the server carries), DTYPE (f16 on the wire), FRAME (256 samples per `samples`
#        frame), MODEL (a safetensors head for `serve --model`; default the embedded one), CONFIG
#        (a `serve --config` TOML, e.g. a larger `max_batch`), OUT
#        (copy the table there), SEND_QUEUE (4096: each subscriber's send queue per class,
#        `hello`'s `send_queue`; the server's default of 400 CRITICAL results is ~20 ms of one
#        stream at these rates, and a subscriber that falls further behind is closed),
#        LOADGEN_ARGS (more loadgen flags, e.g. `--max-rss-mb 4096`)
#
# Load: `loadgen --scenario steady` with PRODUCERS producers sending whole samples in `samples`
# frames (docs/PROTOCOL.md section 4.4), one subscriber on every stream asking for `results`
# frames (section 4.5). The server's CPU per sample is its process CPU time over the run
# (/proc/PID/stat) per result delivered; GPU utilisation is nvidia-smi's, sampled every 200 ms
# during the run (mean and max), where nvidia-smi exists. Under each run's "serving" line:
# the server's busiest threads and the host's busy cores over the run (scripts/thread_cpu.py):
# a thread near 100% while cores idle is a serial stage; and where a batch's time went
# (scripts/metrics_breakdown.py: each device's run, the engine's submit-to-done). "offered" is
# what the producers managed to send (below RATE when they could not keep up) and the share of
# their time the server's ingest_backpressure held them: a low rate offered with little pause
# means the load generator, not the server, set the figure.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/fusion-engine}
DEVICES=${DEVICES:-cuda:0 cuda:0:instances=2 cpu wgpu:0}
SECS=${SECS:-10}
PRODUCERS=${PRODUCERS:-8}
RATE=${RATE:-4000000}
DTYPE=${DTYPE:-f16}
FRAME=${FRAME:-256}
SEND_QUEUE=${SEND_QUEUE:-4096}
WORK=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$WORK"' EXIT
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
# The metrics listener's /healthz; python3 where curl is missing (the GPU host's image may lack it).
healthy() {
  if command -v curl >/dev/null; then curl -sf "127.0.0.1:$1/healthz" >/dev/null 2>&1
  else python3 -c "import sys, urllib.request; urllib.request.urlopen('http://127.0.0.1:$1/healthz', timeout=1)" 2>/dev/null; fi
}
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat" 2>/dev/null || echo 0; }
TCK=$(getconf CLK_TCK)
echo "== serve end to end on $(nproc) cores, $(date -u +%FT%TZ), $BIN: $PRODUCERS producers, $DTYPE wire, samples frames of $FRAME, results frames, ${SECS}s per device"

for spec in $DEVICES; do
  tag=$(echo "$spec" | tr ':=,' '___')
  P=$(free_port); M=$(free_port)
  "$BIN" serve ${MODEL:+--model "$MODEL"} ${CONFIG:+--config "$CONFIG"} --devices "$spec" --listen "127.0.0.1:$P" --metrics "127.0.0.1:$M" >"$WORK/$tag.serve.log" 2>&1 &
  SP=$!
  up=0
  for _ in $(seq 300); do
    if healthy "$M"; then up=1; break; fi
    kill -0 "$SP" 2>/dev/null || break
    sleep 0.2
  done
  if [ "$up" != 1 ]; then
    echo "$spec: the server did not start: $(sed 's/\x1b\[[0-9;]*m//g' "$WORK/$tag.serve.log" | grep -v '^\s*$' | tail -1)"
    echo "{\"spec\": \"$spec\", \"error\": \"server did not start\"}" >"$WORK/$tag.json"
    kill "$SP" 2>/dev/null; wait "$SP" 2>/dev/null
    continue
  fi
  grep -m1 "serving" "$WORK/$tag.serve.log" | sed 's/^.*fusion-engine serving/  serving/'
  SMI=
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$WORK/$tag.smi" 2>/dev/null &
    SMI=$!
  fi
  t0=$(cpu_ticks "$SP")
  python3 scripts/thread_cpu.py snap "$SP" "$WORK/$tag.threads" 2>/dev/null
  "$BIN" loadgen --url "ws://127.0.0.1:$P/" --metrics "127.0.0.1:$M" --scenario steady \
    --rate "$RATE" --producers "$PRODUCERS" --subscribers "$PRODUCERS" --split-streams --samples-per-frame "$FRAME" \
    --send-queue "$SEND_QUEUE" --batch-results --dtype "$DTYPE" --duration "$SECS" --plot "$WORK/$tag.svg" --json ${LOADGEN_ARGS:-} \
    >"$WORK/$tag.json" 2>"$WORK/$tag.err" || echo "$spec: loadgen: $(tail -2 "$WORK/$tag.err")"
  t1=$(cpu_ticks "$SP")
  python3 scripts/thread_cpu.py diff "$SP" "$WORK/$tag.threads" 2>/dev/null
  python3 scripts/metrics_breakdown.py "127.0.0.1:$M" 2>/dev/null
  [ -n "$SMI" ] && kill "$SMI" 2>/dev/null
  echo $((t1 - t0)) >"$WORK/$tag.ticks"
  kill -TERM "$SP" 2>/dev/null; timeout 20 tail --pid="$SP" -f /dev/null
done

python3 - "$WORK" "$TCK" "$DEVICES" >"$WORK/serve-table.md" <<'PY'
import json, os, sys
work, tck, specs = sys.argv[1], float(sys.argv[2]), sys.argv[3].split()
def tag(s):
    return s.replace(":", "_").replace("=", "_").replace(",", "_")
def load(s):
    try:
        return json.load(open(os.path.join(work, tag(s) + ".json")))
    except (OSError, ValueError):
        return None
def smi(s):
    try:
        v = [float(x) for x in open(os.path.join(work, tag(s) + ".smi")).read().split() if x.replace(".", "").isdigit()]
    except OSError:
        return "-"
    return f"{sum(v) / len(v):.0f}% (max {max(v):.0f}%)" if v else "-"
print("| devices | samples/s carried | offered (producers paused) | server CPU us/sample | p50 ms | p99 ms | GPU util mean (max) | loadgen checks |")
print("|---|---|---|---|---|---|---|---|")
carried = {}
for s in specs:
    r = load(s)
    if not r or "samples_per_s" not in r:
        print(f"| {s} | - (server did not start or loadgen failed) | - | - | - | - | - | - |")
        continue
    n = r["samples_per_s"] * r["duration_s"]
    try:
        ticks = float(open(os.path.join(work, tag(s) + ".ticks")).read())
        cpu = f"{ticks / tck / max(n, 1) * 1e6:.2f}"
    except (OSError, ValueError):
        cpu = "-"
    lat = [v for v in (r.get("latency_ms") or {}).values() if v]
    # The steady scenario's classes together: the largest p50/p99 of a class with results.
    p50 = max((v.get("p50") or 0 for v in lat), default=None)
    p99 = r.get("fast_p99_ms")
    bad = [k for k, v in r.get("checks", {}).items() if not v]
    carried[s] = r["samples_per_s"]
    f = lambda v: "-" if v is None else f"{v:.1f}"
    offered = r.get("offered_samples_per_s")
    paused = r.get("producer_paused_share")
    off = "-" if offered is None else f"{offered:.0f}" + ("" if paused is None else f" ({paused * 100:.0f}%)")
    print(f"| {s} | {r['samples_per_s']:.0f} | {off} | {cpu} | {f(p50)} | {f(p99)} | {smi(s)} | {', '.join(b + ' FALSE' for b in bad) or 'all true'}; overload closes {r.get('closes', {}).get('1013', 0)} |")
# The best CUDA row (several specs of one GPU, e.g. `cuda:0 cuda:0:instances=2`), named.
best = max(((v, k) for k, v in carried.items() if k.startswith("cuda")), default=None)
cuda = best[0] if best else None
cpu = carried.get("cpu")
print()
print("Goals (issue 18, H200 host): cuda:0 >= 1.5M samples/s through serve: "
      + ("-" if cuda is None else f"{cuda:.0f} with {best[1]} ({'met' if cuda >= 1.5e6 else 'NOT met'})")
      + "; cuda:0 / cpu >= 5x: "
      + ("-" if cuda is None or not cpu else f"{cuda / cpu:.2f}x ({'met' if cuda / cpu >= 5 else 'NOT met'})"))
PY
cat "$WORK/serve-table.md"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$WORK/serve-table.md" "$OUT/serve-table.md"
  cat "$WORK"/*.json >"$OUT/serve-check.json" 2>/dev/null || true
  cat "$WORK"/*.serve.log "$WORK"/*.err >"$OUT/serve-check.log" 2>/dev/null || true
fi
