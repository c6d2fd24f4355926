#!/usr/bin/env bash
# The GPU check: run on a machine with an NVIDIA GPU, from a release binary built elsewhere
# (no cargo or network needed there; python3 with torch for the PyTorch comparison).
#
#   scripts/gpu-check.sh [BINARY]        (default: target/release/fusion-engine)
#   env: ITERS (default 30), BACKENDS (default "cuda wgpu cpu"), OUT (copy the table there),
#        TESTS (test executables built elsewhere, e.g. `cargo test --no-run` outputs of
#        tests/cuda_backend.rs, tests/cuda_pinned.rs, tests/wgpu_backend.rs and
#        tests/wgpu_kernels.rs, run here after
#        the CUDA bench),
#        STEP_TIMEOUT (seconds per step, default 150), COMPILE (torch.compile too: 1, default),
#        TUNE (1, default: scripts/cuda-tune.sh after the table, into $OUT/cuda-tune.log),
#        CPU_CHECK (1, default: scripts/cpu-check.sh last, the host-side engine and server
#        throughput checks on this host's cores, into $OUT/cpu-check.txt),
#        SERVE_CHECK (1, default: scripts/serve-device-check.sh after the pinned table: `serve` on
#        cuda:0, cpu and wgpu:0 driven by `loadgen --url`, 8 producers, f16 wire; issue 18),
#        SERVE_MORE (1, default: then frames and batches of 1024 with 1-3 CUDA instances, and
#        FUSION_KEEP_FRAMES=0 against the default; about 50 s more),
#        NCU (1, default: Nsight Compute on the f16 epilogue with each kernel, where ncu exists)
#
# After the CUDA bench, the f16 head's device time against its GEMMs alone is printed for both
# paths of the projections h (docs/DESIGN.md section 2.5): written in f16 (the default) and in
# f32 (FUSION_CUDA_H=f32), at B = 1024 and 8192. Then `bench --pinned` at B = 8192 in f32 and
# f16 (inputs page-locked in place, copied to the device directly: docs/DESIGN.md section 6.7)
# beside the pageable figure of the CUDA bench, then again with FUSION_CUDA_EPILOGUE=vec, with
# FUSION_CUDA_TAPER=1 (the last chunks halving) and with chunks of PINNED_CHUNKS MiB (default
# "4 8 16"; the default chunk is 32 MiB).
#
# Runs `devices`, `selftest` on every backend, `bench` for cuda/wgpu/cpu at B = 64, 1024, 8192 in
# f32 and f16, the same head in PyTorch CUDA (eager and torch.compile) on the same shapes, the
# projections alone (fusion-engine's run_projections_only; PyTorch's F.linear = cuBLAS), and the
# host<->device copy ceiling. `scripts/cuda-tune.sh` sweeps the CUDA pipeline's knobs. Prints one markdown table (and writes it, with the raw JSON lines,
# to $OUT/ when OUT is set). Exits non-zero if a selftest or a test executable fails. The CUDA
# steps come first and every step has a time limit, so that a short lease gets the GPU figures.
#
# Vulkan (wgpu) on machines without the loader: carry the `.gl` folder of loader .debs (see the
# device README's recipe); it is unpacked here and the NVIDIA ICD is pointed at when present.
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/fusion-engine}
ITERS=${ITERS:-30}
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
COMPILE=${COMPILE:-1}
TUNE=${TUNE:-1}
CPU_CHECK=${CPU_CHECK:-1}
SERVE_CHECK=${SERVE_CHECK:-1}
SERVE_MORE=${SERVE_MORE:-1}
TESTS=${TESTS:-}
T() { timeout -k 5 "$STEP_TIMEOUT" "$@"; }
# Backends to bench (selftest always runs all three); e.g. BACKENDS="cuda cpu" to skip a wgpu
# that is only lavapipe (about 0.5 GFLOP/s: B=8192 takes minutes per batch there).
BACKENDS=${BACKENDS:-cuda wgpu cpu}
WORK=$(mktemp -d)
status=0

if [ -d .gl ] && ! ldconfig -p 2>/dev/null | grep -q libvulkan; then
  for f in .gl/*.deb; do dpkg -x "$f" /; done
  ldconfig
fi
if [ -f /usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json ]; then
  export VK_DRIVER_FILES=/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json
  export __EGL_VENDOR_LIBRARY_FILENAMES=/usr/local/nvidia/share/glvnd/egl_vendor.d/10_nvidia.json
fi

echo "== machine"
nvidia-smi --query-gpu=name,driver_version,memory.total,pcie.link.gen.current,pcie.link.width.current --format=csv 2>&1 || true
echo "== devices"
T "$BIN" devices 2>&1 | tee "$WORK/devices.txt"

run_selftest() {
  if ! T "$BIN" selftest --backend "$1" 2>&1 | tee "$WORK/selftest-$1.txt"; then
    echo "selftest --backend $1 FAILED"
    status=1
  fi
}
run_bench() {
  T "$BIN" bench --backend "$1" --batch 64,1024,8192 --dtype f32,f16 --iters "$ITERS" --json \
    >"$WORK/bench-$1.jsonl" 2>"$WORK/bench-$1.err" || echo "bench --backend $1 failed: $(tail -3 "$WORK/bench-$1.err")"
  cat "$WORK/bench-$1.jsonl"
}
run_tests() {
  for t in $TESTS; do
    [ -x "$t" ] || continue
    echo "== tests: $(basename "$t")"
    if ! T "$t" --test-threads 1 --nocapture 2>&1 | tee "$WORK/test-$(basename "$t").txt" | grep -E "^test |test result|skipping|panicked" ; then :; fi
    if ! grep -q "test result: ok" "$WORK/test-$(basename "$t").txt"; then
      echo "tests $(basename "$t") FAILED; each test again in a process of its own:"
      status=1
      for name in $("$t" --list --format terse 2>/dev/null | sed -n 's/: test$//p'); do
        if T "$t" --exact "$name" >"$WORK/one.txt" 2>&1; then r=ok; else r=FAILED; fi
        echo "  $name: $r $(grep -m1 -E 'panicked|cannot open' -A1 "$WORK/one.txt" | tail -1 | cut -c1-160)"
      done
    fi
  done
}

echo "== selftest cuda"
run_selftest cuda
for epi in warp vec; do
  echo "== selftest cuda, warp-per-row epilogue (opt-in: FUSION_CUDA_EPILOGUE=$epi)"
  if ! FUSION_CUDA_EPILOGUE=$epi T "$BIN" selftest --backend cuda 2>&1 | tee "$WORK/selftest-cuda-$epi.txt"; then
    echo "selftest --backend cuda with FUSION_CUDA_EPILOGUE=$epi FAILED"
    status=1
  fi
done
echo "== selftest cuda, projections h in f32 for half inputs too (FUSION_CUDA_H=f32, the path before f16 h)"
if ! FUSION_CUDA_H=f32 T "$BIN" selftest --backend cuda 2>&1 | tee "$WORK/selftest-cuda-h-f32.txt"; then
  echo "selftest --backend cuda with FUSION_CUDA_H=f32 FAILED"
  status=1
fi
echo "== bench cuda"
case " $BACKENDS " in *" cuda "*) run_bench cuda ;; esac
echo "== f16 head on the device vs its cuBLAS GEMMs: h in f16 (default) and in f32 (FUSION_CUDA_H=f32); epilogues block (default), warp, vec (FUSION_CUDA_EPILOGUE)"
case " $BACKENDS " in *" cuda "*)
  for cfg in auto:block f32:block auto:warp auto:vec; do
    FUSION_CUDA_H=${cfg%%:*} FUSION_CUDA_EPILOGUE=${cfg##*:} T "$BIN" bench --backend cuda --batch 1024,8192 --dtype f16 --iters "$ITERS" --json \
      >"$WORK/bench-cuda-h-$cfg.jsonl" 2>"$WORK/bench-cuda-h-$cfg.err" \
      || echo "bench with FUSION_CUDA_H/EPILOGUE=$cfg failed: $(tail -3 "$WORK/bench-cuda-h-$cfg.err")"
  done
  python3 - "$WORK" <<'PY'
import json, os, sys
work = sys.argv[1]
print("| FUSION_CUDA_H:EPILOGUE | B | dtype | device head ms | device GEMMs ms | head/GEMMs | runs with half h | f32 reruns | samples/s (host to host) |")
print("|---|---|---|---|---|---|---|---|---|")
for hp in ("auto:block", "f32:block", "auto:warp", "auto:vec"):
    p = os.path.join(work, f"bench-cuda-h-{hp}.jsonl")
    for l in (open(p) if os.path.exists(p) else []):
        if not l.startswith("{"):
            continue
        try:
            r = json.loads(l)
        except ValueError:
            continue
        g = lambda k, fmt: "-" if r.get(k) is None else fmt.format(r[k])
        print(f"| {hp} | {r.get('batch')} | {r.get('dtype')} | {g('device_head_ms', '{:.3f}')} | {g('device_proj_ms', '{:.3f}')} "
              f"| {g('device_head_over_proj', '{:.2f}x')} | {g('half_h_runs', '{}')} | {g('h_f32_reruns', '{}')} | {g('samples_per_s', '{:.0f}')} |")
PY
  ;;
esac
echo "== pinned inputs (copied directly) vs pageable (staged), B = 8192; pinned with the vec epilogue, tapered chunks, other chunk sizes (PINNED_CHUNKS MiB)"
case " $BACKENDS " in *" cuda "*)
  T "$BIN" bench --backend cuda --pinned --batch 8192 --dtype f32,f16 --iters "$ITERS" --json \
    >"$WORK/bench-cuda-pinned.jsonl" 2>"$WORK/bench-cuda-pinned.err" \
    || echo "bench --pinned failed: $(tail -3 "$WORK/bench-cuda-pinned.err")"
  FUSION_CUDA_EPILOGUE=vec T "$BIN" bench --backend cuda --pinned --batch 8192 --dtype f32,f16 --iters "$ITERS" --json \
    >"$WORK/bench-cuda-pinned-vec.jsonl" 2>"$WORK/bench-cuda-pinned-vec.err" \
    || echo "bench --pinned (vec) failed: $(tail -3 "$WORK/bench-cuda-pinned-vec.err")"
  FUSION_CUDA_TAPER=1 T "$BIN" bench --backend cuda --pinned --batch 8192 --dtype f32,f16 --iters "$ITERS" --json \
    >"$WORK/bench-cuda-pinned-taper.jsonl" 2>"$WORK/bench-cuda-pinned-taper.err" \
    || echo "bench --pinned (taper) failed: $(tail -3 "$WORK/bench-cuda-pinned-taper.err")"
  for c in ${PINNED_CHUNKS:-4 8 16}; do
    FUSION_CUDA_CHUNK_MIB=$c T "$BIN" bench --backend cuda --pinned --batch 8192 --dtype f32,f16 --iters "$ITERS" --json \
      >"$WORK/bench-cuda-pinned-chunk$c.jsonl" 2>"$WORK/bench-cuda-pinned-chunk$c.err" \
      || echo "bench --pinned (chunks of $c MiB) failed: $(tail -3 "$WORK/bench-cuda-pinned-chunk$c.err")"
  done
  python3 - "$WORK" <<'PY'
import glob, json, os, sys
work = sys.argv[1]
print("| inputs | setting | B | dtype | ms (host to host) | samples/s | H2D GB/s | direct share | host stage / wait / drain ms |")
print("|---|---|---|---|---|---|---|---|---|")
names = ["bench-cuda.jsonl", "bench-cuda-pinned.jsonl", "bench-cuda-pinned-vec.jsonl", "bench-cuda-pinned-taper.jsonl"]
names += sorted((os.path.basename(p) for p in glob.glob(os.path.join(work, "bench-cuda-pinned-chunk*.jsonl"))),
                key=lambda n: int(n[len("bench-cuda-pinned-chunk"):-len(".jsonl")]))
for name in names:
    p = os.path.join(work, name)
    setting = {"bench-cuda.jsonl": "defaults", "bench-cuda-pinned.jsonl": "defaults",
               "bench-cuda-pinned-vec.jsonl": "FUSION_CUDA_EPILOGUE=vec",
               "bench-cuda-pinned-taper.jsonl": "FUSION_CUDA_TAPER=1"}.get(
        name, "FUSION_CUDA_CHUNK_MIB=" + name[len("bench-cuda-pinned-chunk"):-len(".jsonl")])
    for l in (open(p) if os.path.exists(p) else []):
        if not l.startswith("{"):
            continue
        try:
            r = json.loads(l)
        except ValueError:
            continue
        if r.get("batch") != 8192:
            continue
        g = lambda k, fmt: "-" if r.get(k) is None else fmt.format(r[k])
        host = (f"{r['host_stage_ms']:.2f} / {r['host_wait_ms']:.2f} / {r['host_drain_ms']:.2f}"
                if "host_stage_ms" in r else "-")
        print(f"| {r.get('inputs', 'pageable')} | {setting} | {r['batch']} | {r.get('dtype')} | {g('ms_per_batch', '{:.3f}')} "
              f"| {g('samples_per_s', '{:.0f}')} | {g('h2d_gbps', '{:.1f}')} | {g('h2d_direct_share', '{:.3f}')} | {host} |")
PY
  ;;
esac
# Nsight Compute on the f16 epilogue, each kernel (where ncu is installed): throughput against
# the memory's peak says whether a kernel is bound by bytes moved or by bytes in flight.
if [ "${NCU:-1}" = 1 ] && command -v ncu >/dev/null; then
  echo "== ncu: the f16 epilogue at B = 8192, each kernel (FUSION_CUDA_EPILOGUE)"
  for epi in block warp vec; do
    FUSION_CUDA_EPILOGUE=$epi T ncu --clock-control none --kernel-name regex:fusion_epilogue --launch-count 2 \
      --section SpeedOfLight --section Occupancy "$BIN" bench --backend cuda --batch 8192 --dtype f16 --iters 1 \
      >"$WORK/ncu-$epi.txt" 2>&1 || echo "ncu ($epi) failed: $(tail -2 "$WORK/ncu-$epi.txt")"
    grep -E "fusion_epilogue|Duration|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per" "$WORK/ncu-$epi.txt" | head -16
    [ -n "${OUT:-}" ] && mkdir -p "$OUT" && cp "$WORK/ncu-$epi.txt" "$OUT/"
  done
fi
# Issue 18's figures through the server come right after the head's CUDA figures, before
# the slower steps, so that a short lease still gets them.
if [ "$SERVE_CHECK" = 1 ]; then
  echo "== serve end to end: cuda:0, cuda:0 with 2 instances, cpu, wgpu:0 (scripts/serve-device-check.sh)"
  timeout -k 5 200 bash scripts/serve-device-check.sh "$BIN" 2>&1 | tee "$WORK/serve-check.txt"
  [ -n "${OUT:-}" ] && mkdir -p "$OUT" && cp "$WORK/serve-check.txt" "$OUT/serve-check.txt"
  if [ "$SERVE_MORE" = 1 ]; then
    printf 'max_batch = 1024\n' >"$WORK/b1024.toml"
    echo "== serve, frames and batches of 1024: cuda:0 with 1, 2 and 3 instances, cpu"
    FRAME=1024 CONFIG="$WORK/b1024.toml" LOADGEN_ARGS="--max-rss-mb 8192" SECS=6 OUT= \
      DEVICES="cuda:0 cuda:0:instances=2 cuda:0:instances=3 cpu" \
      timeout -k 5 90 bash scripts/serve-device-check.sh "$BIN" 2>&1 | tee "$WORK/serve-1024.txt"
    echo "== serve, every samples block copied into the pool (FUSION_KEEP_FRAMES=0): the A/B of blocks read in place"
    FUSION_KEEP_FRAMES=0 SECS=6 OUT= DEVICES="cuda:0 cuda:0:instances=2" \
      timeout -k 5 60 bash scripts/serve-device-check.sh "$BIN" 2>&1 | tee "$WORK/serve-copied.txt"
    [ -n "${OUT:-}" ] && cp "$WORK/serve-1024.txt" "$WORK/serve-copied.txt" "$OUT/"
  fi
fi
echo "== PyTorch eager (same head, same shapes) and the copy ceiling"
T python3 scripts/torch_head.py --device cuda --batch 64,1024,8192 --dtype f32,f16 --iters "$ITERS" \
  --compile eager >"$WORK/torch.jsonl" 2>"$WORK/torch.err" || echo "torch_head.py failed: $(tail -3 "$WORK/torch.err")"
T python3 scripts/torch_head.py --device cuda --copy-ceiling >"$WORK/copy.jsonl" 2>>"$WORK/torch.err" || true
cat "$WORK/torch.jsonl" "$WORK/copy.jsonl"
run_tests
echo "== selftest wgpu, cpu"
run_selftest wgpu
run_selftest cpu
echo "== bench cpu, wgpu"
for be in cpu wgpu; do
  case " $BACKENDS " in *" $be "*) run_bench "$be" ;; esac
done
if [ "$COMPILE" = 1 ]; then
  echo "== torch.compile"
  T python3 scripts/torch_head.py --device cuda --batch 64,1024,8192 --dtype f32,f16 --iters "$ITERS" \
    --compile compile >>"$WORK/torch.jsonl" 2>>"$WORK/torch.err" || echo "torch.compile failed or timed out: $(tail -3 "$WORK/torch.err")"
  grep torch-compile "$WORK/torch.jsonl" || true
fi

echo "== table"
python3 - "$WORK" >"$WORK/gpu-table.md" <<'PY'
import json, os, sys
work = sys.argv[1]
DIMS, D, M = (1024, 768, 128), 512, 3  # the embedded default head

def lines(name):
    p = os.path.join(work, name)
    out = []
    if os.path.exists(p):
        for l in open(p):
            l = l.strip()
            if l.startswith("{"):
                try:
                    out.append(json.loads(l))
                except ValueError:
                    pass
    return out

eng = {}
for be in ("cuda", "wgpu", "cpu"):
    for r in lines(f"bench-{be}.jsonl"):
        eng[(be, r["batch"], r["dtype"])] = r
tor = {(r["impl"], r.get("batch"), r.get("dtype")): r for r in lines("torch.jsonl") if "error" not in r}
copy = (lines("copy.jsonl") or [{}])[0]

def f(v, fmt="{:.0f}"):
    return "-" if v is None else fmt.format(v)

gpu = next((r["device"] for r in eng.values() if r.get("backend") == "cuda"), None) or copy.get("gpu", "?")
print(f"GPU: {gpu}; head: embedded default (d = {DIMS}, D = {D}); ms: median batch time; samples/s: throughput over the run's iterations\n")
print("| B | dtype | cuda ms (host to host) | cuda samples/s | cuda proj-only ms (host) | device head ms | device proj ms (cuBLAS) "
      "| device head/proj | cuda H2D GB/s (its copies) | host stage / wait / drain ms "
      "| wgpu samples/s | cpu samples/s | torch eager fwd ms | torch proj ms | torch eager e2e samples/s "
      "| torch pinned e2e samples/s | torch.compile e2e samples/s | cuda / torch eager e2e |")
print("|" + "---|" * 18)
for b in (64, 1024, 8192):
    for dt in ("f32", "f16"):
        c = eng.get(("cuda", b, dt), {})
        w = eng.get(("wgpu", b, dt), {})
        p = eng.get(("cpu", b, dt), {})
        te = tor.get(("torch-eager", b, dt), {})
        tc = tor.get(("torch-compile", b, dt), {})
        ratio = c["samples_per_s"] / te["e2e_samples_per_s"] if c.get("samples_per_s") and te.get("e2e_samples_per_s") else None
        host = (f"{c['host_stage_ms']:.2f} / {c['host_wait_ms']:.2f} / {c['host_drain_ms']:.2f}"
                if "host_stage_ms" in c else "-")
        print(f"| {b} | {dt} | {f(c.get('ms_per_batch'), '{:.3f}')} | {f(c.get('samples_per_s'))} "
              f"| {f(c.get('proj_ms_per_batch'), '{:.3f}')} | {f(c.get('device_head_ms'), '{:.3f}')} "
              f"| {f(c.get('device_proj_ms'), '{:.3f}')} | {f(c.get('device_head_over_proj'), '{:.2f}x')} "
              f"| {f(c.get('h2d_gbps'), '{:.1f}')} | {host} "
              f"| {f(w.get('samples_per_s'))} | {f(p.get('samples_per_s'))} | {f(te.get('ms_per_batch'), '{:.3f}')} "
              f"| {f(te.get('proj_ms_per_batch'), '{:.3f}')} "
              f"| {f(te.get('e2e_samples_per_s'))} | {f(te.get('e2e_pinned_samples_per_s'))} "
              f"| {f(tc.get('e2e_samples_per_s'))} | {f(ratio, '{:.2f}x')} |")
print()
print(f"Copy ceiling (PyTorch, 256 MiB): H2D pinned {f(copy.get('h2d_pinned_gbps'), '{:.1f}')} GB/s, "
      f"D2H pinned {f(copy.get('d2h_pinned_gbps'), '{:.1f}')} GB/s, H2D pageable {f(copy.get('h2d_pageable_gbps'), '{:.1f}')} GB/s, "
      f"D2H pageable {f(copy.get('d2h_pageable_gbps'), '{:.1f}')} GB/s.")
print("cuda ms and proj-only ms are host to host: the caller's (pageable) inputs in, results back in the caller's "
      "buffers, as torch eager e2e is; device head/proj ms are the same runs' kernels alone (CUDA events: GEMMs, "
      "then GEMMs + the fused epilogue); 'its copies' is the rate of fusion-engine's own pinned H2D copies (events). "
      "Goals at B=8192: head <= 1.3x the projections alone, >= 1.5x torch eager e2e, copies >= 80% of the pinned ceiling.")
PY
cat "$WORK/gpu-table.md"
if [ -n "${OUT:-}" ]; then
  mkdir -p "$OUT"
  cp "$WORK/gpu-table.md" "$OUT/gpu-table.md"
  cat "$WORK"/*.jsonl >"$OUT/gpu-check.jsonl" 2>/dev/null || true
  cat "$WORK"/selftest-*.txt "$WORK"/test-*.txt "$WORK"/*.err >"$OUT/gpu-check.log" 2>/dev/null || true
fi
if [ "$TUNE" = 1 ]; then
  echo "== cuda-tune (chunk sizes, epilogues)"
  bash scripts/cuda-tune.sh "$BIN" 2>&1 | tee "$WORK/cuda-tune.log"
  [ -n "${OUT:-}" ] && cp "$WORK/cuda-tune.log" "$OUT/cuda-tune.log"
fi
if [ "$CPU_CHECK" = 1 ]; then
  echo "== cpu-check (issues 5 and 6 on this host's CPUs)"
  timeout -k 5 300 bash scripts/cpu-check.sh "$BIN" 2>&1 | tail -16
fi
exit $status
