#!/usr/bin/env bash
# Issue 6's efficiency point, taken apart: what the server and its load generator cost per
# sample apart from the device, and so the most the server can carry on this host against
# `bench --backend cpu --batch 256`.
#
#   scripts/server-ceiling.sh [BINARY]   (default: target/release/fusion-engine)
#   env: RATE (samples/s offered to the tiny head, default 90000 x cores / 2), SECS (4),
#        PRODUCERS (2), REPS (3), LOADGEN_ARGS (more loadgen flags, e.g. --batch-results)
#
# The device cost of the embedded head (D = 512) is Kd = cores / kernel samples/s (the kernel
# keeps every core busy). `serve --model tiny` (scripts/tiny_head.py: the same modalities and
# input widths, so the same bytes on the wire, D = 8) runs in its own process; `loadgen --url`
# drives it at RATE (samples frames of 256, one subscriber) from another. Their CPU per result,
# less the tiny head's own device cost, is what the server (S) and the clients (C) cost per
# sample. Sharing the host's cores, the server can then carry at most
# cores / (Kd + S + C) samples/s, i.e. Kd / (Kd + S + C) of the kernel; 80% needs S + C <= Kd / 4.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/fusion-engine}
CORES=$(nproc)
RATE=${RATE:-$(( 45000 * CORES ))}
SECS=${SECS:-4}
PRODUCERS=${PRODUCERS:-2}
REPS=${REPS:-3}
WORK=$(mktemp -d)
python3 scripts/tiny_head.py "$WORK/tiny.safetensors"
field() { python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(round(float(r['$1'])))"; }
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)
echo "== server ceiling on $CORES cores${LOADGEN_ARGS:+ (loadgen $LOADGEN_ARGS)} ($(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)), $(date -u +%FT%TZ)"
for r in $(seq "$REPS"); do
  K=$(timeout 120 "$BIN" bench --backend cpu --batch 256 --iters 400 --json 2>/dev/null | field samples_per_s)
  KT=$(timeout 120 "$BIN" bench --backend cpu --batch 256 --iters 4000 --model "$WORK/tiny.safetensors" --json 2>/dev/null | field samples_per_s)
  P=$(free_port); M=$(free_port)
  "$BIN" serve --model "$WORK/tiny.safetensors" --listen "127.0.0.1:$P" --metrics "127.0.0.1:$M" >"$WORK/serve.log" 2>&1 &
  SP=$!
  for _ in $(seq 150); do curl -sf "127.0.0.1:$M/healthz" >/dev/null && break; sleep 0.2; done
  s0=$(cpu_ticks "$SP")
  python3 - "$BIN" "$P" "$M" "$RATE" "$PRODUCERS" "$SECS" "$WORK/lg.json" "${LOADGEN_ARGS:-}" <<'PY'
import resource, subprocess, sys
b, p, m, rate, prod, secs, out, extra = sys.argv[1:]
with open(out, "w") as f:
    subprocess.run([b, "loadgen", "--url", f"ws://127.0.0.1:{p}/", "--metrics", f"127.0.0.1:{m}",
                    "--scenario", "steady", "--rate", rate, "--producers", prod, "--subscribers", "1",
                    "--samples-per-frame", "256", "--duration", secs, "--plot", out + ".svg", "--json", *extra.split()],
                   stdout=f, stderr=subprocess.DEVNULL, timeout=120)
u = resource.getrusage(resource.RUSAGE_CHILDREN)
open(out + ".cpu", "w").write(f"{u.ru_utime + u.ru_stime}")
PY
  s1=$(cpu_ticks "$SP")
  kill -TERM "$SP"; timeout 15 tail --pid="$SP" -f /dev/null; kill -9 "$SP" 2>/dev/null
  python3 - "$WORK/lg.json" "$K" "$KT" "$s0" "$s1" "$TCK" "$CORES" "$SECS" <<'PY'
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except ValueError:
    print("loadgen gave no report"); sys.exit()
k, kt, s0, s1, tck, cores, secs = map(float, sys.argv[2:])
n = r["samples_per_s"] * secs
kd, kdt = cores * 1e6 / k, cores * 1e6 / kt
server = (s1 - s0) / tck / n * 1e6 - kdt
clients = float(open(sys.argv[1] + ".cpu").read()) / n * 1e6
print(f"kernel {k:.0f}/s (Kd {kd:.1f} us/sample); tiny head kernel {kt:.0f}/s ({kdt:.2f} us); "
      f"through the tiny-head server {r['samples_per_s']:.0f}/s of {r['offered_samples_per_s']:.0f} offered: "
      f"server {server:.1f} + clients {clients:.1f} us/sample besides the device "
      f"(80% needs <= {kd / 4:.1f}); ceiling {kd / (kd + server + clients):.0%} of the kernel "
      f"(clients alone: {kd / (kd + clients):.0%}); steal {r.get('host_steal_pct') or 0:.1f}%")
PY
done
