#!/usr/bin/env bash
# Tuning sweep for the CUDA pipeline on a GPU machine, from a carried release binary:
# FUSION_CUDA_CHUNK_MIB (chunk size of the copy/compute pipeline) over CHUNKS, REPS times
# interleaved (host noise hits every setting alike), then the warp-per-row epilogues (opt-in,
# FUSION_CUDA_EPILOGUE=warp and =vec; each one's selftest first) against the default
# block-per-row one, and
# f32 projections for half inputs (FUSION_CUDA_H=f32) against the default half ones. One
# line per run (bench's human output, with its device/host breakdown).
#
#   scripts/cuda-tune.sh [BINARY]   env: CHUNKS (default "8 16 24 32"), REPS (2), ITERS (30),
#                                        BATCH (1024,8192), DTYPES (f32,f16)
set -uo pipefail
cd "$(dirname "$0")/.."
BIN=${1:-target/release/fusion-engine}
CHUNKS=${CHUNKS:-8 16 24 32}
REPS=${REPS:-2}
ITERS=${ITERS:-30}
BATCH=${BATCH:-1024,8192}
DTYPES=${DTYPES:-f32,f16}
bench() { timeout 90 "$BIN" bench --backend cuda --batch "$BATCH" --dtype "$DTYPES" --iters "$ITERS" 2>&1 | grep -v '^note:'; }
for rep in $(seq "$REPS"); do
  for c in $CHUNKS; do
    echo "== rep $rep: FUSION_CUDA_CHUNK_MIB=$c"
    FUSION_CUDA_CHUNK_MIB=$c bench
  done
done
for epi in warp vec; do
  echo "== warp-per-row epilogue (FUSION_CUDA_EPILOGUE=$epi): selftest, then bench"
  FUSION_CUDA_EPILOGUE=$epi timeout 90 "$BIN" selftest --backend cuda 2>&1 | tail -3
  FUSION_CUDA_EPILOGUE=$epi bench
done
echo "== block-per-row epilogue (default), default chunks"
bench
echo "== projections h in f32 for half inputs too (FUSION_CUDA_H=f32; default: h in the inputs' f16/bf16)"
FUSION_CUDA_H=f32 bench
