#!/usr/bin/env bash
# Packs what a GPU lease needs (docs/PERF.md "GPU"), on this machine: the device has no cargo,
# no registry and no internet. Builds the release binary and the GPU test executables, strips
# them into .gpu/ (the device tool carries at most 64 MiB), and fetches the Vulkan loader
# packages into .gl/ (the device image may lack them). Both folders are listed in
# .git/info/exclude. Then, on the device, with carry [".gpu", ".gl"]:
#
#   bash scripts/gpu-check.sh .gpu/fusion-engine     (env as in docs/PERF.md "The next lease")
#
#   scripts/gpu-pack.sh        env: TESTS (default "cuda_backend cuda_pinned wgpu_kernels")
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=${TESTS:-cuda_backend cuda_pinned wgpu_kernels}
for d in /.gpu/ /.gl/; do
  grep -qxF "$d" .git/info/exclude 2>/dev/null || echo "$d" >>.git/info/exclude
done
mkdir -p .gpu .gl
cargo build --release
strip -o .gpu/fusion-engine target/release/fusion-engine
args=()
for t in $TESTS; do args+=(--test "$t"); done
# The test executables' paths, from cargo's own report (their file names carry a hash).
cargo test --profile ci "${args[@]}" --no-run --message-format json 2>/dev/null |
  python3 -c '
import json, sys
for line in sys.stdin:
    try:
        m = json.loads(line)
    except ValueError:
        continue
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "test" in m.get("target", {}).get("kind", []):
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do
  strip -o ".gpu/$name" "$exe"
done
printf 'max_batch = 1024\n' >.gpu/b1024.toml
if ! ls .gl/libvulkan1_*.deb >/dev/null 2>&1; then
  o='-oAPT::Architecture=amd64 -oAPT::Architectures=amd64 -oDir::State::Lists=/tmp/amd64'
  mkdir -p /tmp/amd64/partial
  # shellcheck disable=SC2086
  apt-get $o update >/dev/null
  # shellcheck disable=SC2086
  (cd .gl && apt-get $o download libvulkan1 libegl1 libglvnd0 libopengl0 libgl1 libglx0 libgles2 >/dev/null)
fi
du -sh .gpu .gl
ls -la .gpu
