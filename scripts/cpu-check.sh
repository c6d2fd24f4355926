#!/usr/bin/env bash
# The host-side throughput checks of issues 5 and 6 on this machine's CPUs, as separate
# commands in ABBA order (a host that speeds up or slows down during the run hits both sides
# alike), from a binary built elsewhere:
#
#   scripts/cpu-check.sh [BINARY]   (default: target/release/fusion-engine)
#   env: REPS (ABBA cycles, default 2), SECS (seconds per timed run, default 3), BATCH (256),
#        PRODUCERS (loadgen producer connections, a list; default max(2, cores / 4)), OUT (copy there)
#
# Issue 5: `bench --devices cpu` (the engine: queue, router, worker) against `bench --backend
# cpu` (the kernel called directly), both throughput by wall clock at the same batch; then the
# in-process `--overhead` comparison. Issue 6: `loadgen --scenario steady` (in-process server
# over loopback, samples frames of BATCH, one subscriber) at 85% and 95% of the kernel's rate
# measured just before, against `bench --backend cpu`; then scripts/server-ceiling.sh (what the
# server and the load generator cost per sample apart from the device, and so the most the
# server can carry here).
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/fusion-engine}
REPS=${REPS:-2}
SECS=${SECS:-3}
BATCH=${BATCH:-256}
CORES=$(nproc)
PRODUCERS=${PRODUCERS:-$(( CORES / 4 > 2 ? CORES / 4 : 2 ))}
WORK=$(mktemp -d)
T() { timeout -k 5 120 "$@"; }
field() { python3 -c "import json,sys; r=json.loads(sys.stdin.read().strip().splitlines()[-1]); print(round(float(r['$1'])))"; }

echo "== host: $CORES cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
K0=$(T "$BIN" bench --backend cpu --batch "$BATCH" --iters 100 --json 2>/dev/null | field samples_per_s)
ITERS=$(( K0 * SECS / BATCH + 1 ))
SAMPLES=$(( ITERS * BATCH ))
echo "calibration: kernel ~$K0 samples/s; $ITERS batches ($SAMPLES samples) per timed run"

kernel() {
  T "$BIN" bench --backend cpu --batch "$BATCH" --iters "$ITERS" --json 2>/dev/null | tee -a "$WORK/kernel.jsonl" | field samples_per_s
}
engine() {
  T "$BIN" bench --devices cpu --batch "$BATCH" --samples "$SAMPLES" --json 2>/dev/null | tee -a "$WORK/engine.jsonl" | field samples_per_s
}
echo "== issue 5: kernel / engine, ABBA x $REPS (samples/s by wall clock)"
for r in $(seq "$REPS"); do
  k1=$(kernel); e1=$(engine); e2=$(engine); k2=$(kernel)
  echo "$(date -u +%T) cycle $r: kernel $k1, engine $e1, engine $e2, kernel $k2: engine/kernel $(python3 -c "print(f'{($e1+$e2)/($k1+$k2):.3f}')")" | tee -a "$WORK/summary.txt"
done
echo "== issue 5: in one process (--overhead)"
T "$BIN" bench --devices cpu --batch "$BATCH" --iters 100 --overhead 2>/dev/null | tee -a "$WORK/summary.txt"

echo "== issue 6: loadgen (in-process server, $PRODUCERS producers, samples frames of $BATCH) against the kernel"
for r in $(seq "$REPS"); do
  k=$(kernel)
  for p in $PRODUCERS; do
  for f in 0.85 0.95; do
    rate=$(python3 -c "print(int($k * $f))")
    T "$BIN" loadgen --scenario steady --rate "$rate" --producers "$p" --subscribers 1 \
      --samples-per-frame "$BATCH" --duration "$SECS" --plot "$WORK/plot.svg" --json \
      >"$WORK/lg.json" 2>/dev/null
    cat "$WORK/lg.json" >>"$WORK/loadgen.jsonl"
    python3 - "$WORK/lg.json" "$k" "$rate" "$p" <<'PY' | tee -a "$WORK/summary.txt"
import json, sys
try:
    r = json.load(open(sys.argv[1]))
except ValueError:
    print("loadgen gave no report"); sys.exit()
k = float(sys.argv[2])
print(f"{sys.argv[4]} producers: kernel {k:.0f}, offered {r.get('offered_samples_per_s', 0):.0f} (target {sys.argv[3]}): "
      f"through the server {r.get('samples_per_s', 0):.0f} results/s = {r.get('samples_per_s', 0) / k:.1%} "
      f"of the kernel; CPU {r.get('process_cpu_us_per_sample', 0) or 0:.1f} us/result, steal {r.get('host_steal_pct', 0) or 0:.1f}%")
PY
  done
  done
done
echo "== issue 6: the server's ceiling on this host (scripts/server-ceiling.sh)"
REPS=$REPS SECS=$SECS bash scripts/server-ceiling.sh "$BIN" 2>&1 | tee -a "$WORK/summary.txt"
echo "== summary"
cat "$WORK/summary.txt"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$WORK/summary.txt" "$OUT/cpu-check.txt"
  cat "$WORK"/*.jsonl >"$OUT/cpu-check.jsonl" 2>/dev/null || true
fi
