#!/usr/bin/env bash
# Issue 20's demo of the NATS JetStream scale-out (docs/DESIGN.md section 11): a nats-server with
# JetStream, one gateway (`serve --nats`), WORKERS `fusion-engine worker`s and `loadgen --url`
# against the gateway; with KILL=1 one worker is SIGKILLed halfway through. Prints loadgen's
# report (lost, duplicated, latency per class) and the gateway's CPU per sample.
#
#   scripts/cluster-demo.sh [BINARY]   (default: target/release/fusion-engine)
#   env: WORKERS (2), KILL (1), SECS (10), RATE (2000 samples/s), DEVICES per worker
#        (cpu:threads=1), MAX_BATCH (the gateway's largest batch, 256), MODE (nats, or local:
#        a plain `serve --devices DEVICES` without NATS, the same load, for comparison),
#        LOADGEN_ARGS (more loadgen flags, e.g. --json)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/fusion-engine}
WORKERS=${WORKERS:-2}
KILL=${KILL:-1}
SECS=${SECS:-10}
RATE=${RATE:-2000}
DEVICES=${DEVICES:-cpu:threads=1}
MAX_BATCH=${MAX_BATCH:-256}
MODE=${MODE:-nats}
WORK=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null; done
  sleep 0.5
  for p in "${PIDS[@]}"; do kill -9 "$p" 2>/dev/null; done
  rm -rf "$WORK"
}
trap cleanup EXIT
free_port() { python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); print(s.getsockname()[1])"; }
wait_port() { for _ in $(seq 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.1; done; echo "nothing listens on $1" >&2; exit 1; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
metric() { curl -sf "127.0.0.1:${2:-$M}/metrics" | awk -v n="$1" '$1 == n || index($1, n "{") == 1 { s += $NF } END { print s + 0 }'; }
[ -x "$BIN" ] || { echo "no $BIN: cargo build --release first" >&2; exit 2; }
P=$(free_port); M=$(free_port)
echo "max_batch = $MAX_BATCH" > "$WORK/serve.toml"
echo "== cluster demo, $(date -u +%FT%TZ), $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
if [ "$MODE" = nats ]; then
  command -v nats-server >/dev/null || { echo "needs nats-server (apt-get install nats-server)" >&2; exit 2; }
  NP=$(free_port); NATS="nats://127.0.0.1:$NP"
  nats-server -a 127.0.0.1 -p "$NP" -js -sd "$WORK/js" >"$WORK/nats.log" 2>&1 & PIDS+=($!)
  wait_port "$NP"
  WPIDS=(); WPORTS=()
  for i in $(seq "$WORKERS"); do
    WM=$(free_port); WPORTS+=("$WM")
    "$BIN" worker --nats "$NATS" --devices "$DEVICES" --ack-wait 2 --name "w$i" \
      --metrics-listen "127.0.0.1:$WM" >"$WORK/w$i.log" 2>&1 &
    WPIDS+=($!); PIDS+=($!)
  done
  # The gateway's own engine only backs its status pages (DESIGN section 11).
  "$BIN" serve --config "$WORK/serve.toml" --nats "$NATS" --listen "127.0.0.1:$P" --metrics "127.0.0.1:$M" \
    --devices cpu:threads=1 >"$WORK/gateway.log" 2>&1 & GP=$!; PIDS+=($GP)
  want="ok $WORKERS compatible workers"
  echo "nats-server $NATS, gateway ws://127.0.0.1:$P/, $WORKERS workers on $DEVICES, max_batch $MAX_BATCH"
else
  "$BIN" serve --config "$WORK/serve.toml" --listen "127.0.0.1:$P" --metrics "127.0.0.1:$M" \
    --devices "$DEVICES" >"$WORK/gateway.log" 2>&1 & GP=$!; PIDS+=($GP)
  want="ok"
  echo "local server ws://127.0.0.1:$P/ on $DEVICES (no NATS), max_batch $MAX_BATCH"
fi
for _ in $(seq 300); do curl -sf "127.0.0.1:$M/healthz" 2>/dev/null | grep -q "^$want" && break; sleep 0.1; done
curl -sf "127.0.0.1:$M/healthz" | grep -q "^$want" || { echo "not healthy: $(curl -s "127.0.0.1:$M/healthz")"; cat "$WORK"/*.log; exit 1; }
s0=$(metric fusion_server_samples_total); c0=$(cpu_ticks "$GP")
# shellcheck disable=SC2086
"$BIN" loadgen --url "ws://127.0.0.1:$P/" --metrics "127.0.0.1:$M" --scenario steady --rate "$RATE" \
  --duration "$SECS" --plot "$WORK/loadgen.svg" ${LOADGEN_ARGS:-} >"$WORK/report" 2>"$WORK/loadgen.err" & LG=$!
if [ "$MODE" = nats ] && [ "$KILL" = 1 ]; then
  sleep "$(python3 -c "print($SECS / 2)")"
  kill -9 "${WPIDS[0]}" 2>/dev/null && echo "SIGKILLed worker w1 at $(date -u +%T) (halfway); its unacked batches go to another after ack_wait (2 s)"
fi
wait "$LG"; rc=$?
c1=$(cpu_ticks "$GP"); s1=$(metric fusion_server_samples_total)
cat "$WORK/report"
[ "$rc" = 0 ] || { echo "loadgen exit status $rc"; tail -5 "$WORK/loadgen.err"; }
python3 - "$c0" "$c1" "$(getconf CLK_TCK)" "$s0" "$s1" <<'PY'
import sys
c0, c1, tck, s0, s1 = map(float, sys.argv[1:])
n = s1 - s0
print(f"server samples batched: {n:.0f}; server CPU {(c1 - c0) / tck:.2f} s"
      + (f" = {(c1 - c0) / tck / n * 1e6:.1f} us per sample" if n else ""))
PY
if [ "$MODE" = nats ]; then
  for i in $(seq "$WORKERS"); do
    if [ "$KILL" = 1 ] && [ "$i" = 1 ]; then continue; fi
    wp=${WPORTS[$((i - 1))]}
    echo "worker w$i: batches pulled $(metric fusion_worker_batches_pulled_total "$wp"), redelivered to it $(metric fusion_worker_redelivered_total "$wp"), results stored $(metric fusion_worker_results_published_total "$wp")"
  done
  echo "gateway: duplicates dropped $(metric fusion_nats_duplicates_dropped_total), batches published $(metric fusion_nats_batches_published_total), publishes refused $(metric fusion_nats_publish_refused_total)"
fi
exit "$rc"
