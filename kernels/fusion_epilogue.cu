// Fused epilogue of the attention fusion head (docs/DESIGN.md section 2), CUDA twin of
// shaders/fusion_epilogue.wgsl.
//
// Input: the projections h_m = W_m x_m of a chunk of n samples, as cuBLAS wrote them ([M, n, D],
// no bias), in f32, or in f16/bf16 for half-precision inputs (docs/DESIGN.md section 2.5: the
// GEMMs accumulate in f32 and round once on output; the kernel widens each element to f32 in
// registers, and all math below is f32 whatever h's dtype). One block per sample row walks the
// row once:
//
//   pass 1  v_m = h_m + b_m (kept in shared memory), s_m = q . tanh(v_m)   (present m only)
//   pass 2  a = softmax(s) over present modalities (absent get exactly 0); a row with a
//           non-finite present projection gets NaN weights (the host's only non-finite check)
//   pass 3  z = sum_m a_m v_m, mean(z)
//   pass 4  var(z) (two-pass, biased), y = (z - mean) / sqrt(var + eps) * gamma + beta
//
// h is read from global memory exactly once; z lives in shared memory (or, for a D too large for
// shared memory, in the output row itself). Reductions: warp shuffles, then one float per warp.
//
// Compiled at run time by NVRTC (no headers needed: half values are read as raw bits). Symbols
// are extern "C" <op>_<dtype>, the dtype being that of h: _f32, _f16, _bf16.
//
// Half h and overflow: a half h element that is +-Inf, NaN or the largest finite magnitude
// (f16 65504, bf16 0x7f7f) reads as NaN, so its row gets NaN weights like any non-finite
// projection. The largest finite value counts because a GEMM that saturates on conversion would
// write it instead of Inf; the host then recomputes the batch with f32 h (docs/DESIGN.md
// section 2.5), so an f16 overflow costs time, never accuracy.
//
// Launch contract (checked by the host, src/backend/cuda/plan.rs):
//   grid = (n, 1, 1), block = (T, 1, 1) with T a multiple of 32 and at most 1024,
//   dynamic shared memory = 4 * (32 + 2*M + (flags & 1 ? D : 0) + (flags & 2 ? M*D : 0)) bytes.
//   mask values are 0 or 1 and every row has at least one 1 (validated on the host). Present
//   inputs are NOT checked for NaN/Inf on the host beforehand: see pass 1.

#define FUSION_FULL_MASK 0xffffffffu

// Flags.
#define FUSION_Z_IN_SHARED 1  // z is kept in shared memory (else in the output row)
#define FUSION_H_IN_SHARED 2  // v_m = h_m + b_m is cached in shared memory (else re-read)

// True unless v is NaN or +-Inf (all exponent bits set); needs no header.
__device__ __forceinline__ bool fusion_is_finite(float v) {
    return (__float_as_uint(v) & 0x7f800000u) != 0x7f800000u;
}

// Half-precision h elements, as raw bits (distinct types so that the loaders overload).
struct fusion_f16 {
    unsigned short bits;
};
struct fusion_bf16 {
    unsigned short bits;
};

// f16 bits to f32, exactly (every f16 is an f32).
__device__ __forceinline__ float fusion_f16_to_f32(unsigned short b) {
#ifdef __CUDA_ARCH__
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(b));
    return f;
#else
    // Host emulation (tests/cuda_emulation): the same conversion in integer arithmetic.
    const unsigned sign = ((unsigned)b & 0x8000u) << 16;
    const unsigned e = ((unsigned)b >> 10) & 0x1fu;
    const unsigned m = (unsigned)b & 0x3ffu;
    if (e == 0x1fu) {
        return __uint_as_float(sign | 0x7f800000u | (m << 13));
    }
    if (e != 0) {
        return __uint_as_float(sign | ((e + 112u) << 23) | (m << 13));
    }
    const float sub = (float)m * 5.9604644775390625e-8f;  // m * 2^-24, exact
    return sign ? -sub : sub;
#endif
}

// One element of h as f32. Half elements at the top of their range (see the header) read as NaN.
__device__ __forceinline__ float fusion_load_h(const float* __restrict__ h, size_t i) {
    return h[i];
}
__device__ __forceinline__ float fusion_load_h(const fusion_f16* __restrict__ h, size_t i) {
    const unsigned short b = h[i].bits;
    return ((b & 0x7fffu) >= 0x7bffu) ? __int_as_float(0x7fc00000) : fusion_f16_to_f32(b);
}
__device__ __forceinline__ float fusion_load_h(const fusion_bf16* __restrict__ h, size_t i) {
    const unsigned short b = h[i].bits;
    return ((b & 0x7fffu) >= 0x7f7fu) ? __int_as_float(0x7fc00000)
                                      : __uint_as_float((unsigned)b << 16);
}

__device__ __forceinline__ float fusion_warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        v += __shfl_xor_sync(FUSION_FULL_MASK, v, o);
    }
    return v;
}

// Sum over the block; every thread gets the total. `red` holds 32 floats. Must be reached by
// every thread of the block (it synchronises).
__device__ __forceinline__ float fusion_block_sum(float v, float* red) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int nwarps = blockDim.x >> 5;
    v = fusion_warp_sum(v);
    __syncthreads();  // the previous call's readers are done with `red`
    if (lane == 0) {
        red[warp] = v;
    }
    __syncthreads();
    float t = (lane < nwarps) ? red[lane] : 0.0f;
    return fusion_warp_sum(t);
}

template <typename H>
__device__ __forceinline__ void fusion_epilogue_block(
    const H* __restrict__ h,                 // [M, n, D] projections without bias
    const float* __restrict__ bias,          // [M, D]
    const float* __restrict__ gate,          // [D] attention query q
    const float* __restrict__ gamma,         // [D] LayerNorm weight
    const float* __restrict__ beta,          // [D] LayerNorm bias
    const unsigned char* __restrict__ mask,  // [n, M], 1 = present
    float* __restrict__ y,                   // [n, D] fused output
    float* __restrict__ w,                   // [n, M] attention weights
    int n, int D, int M, float eps, int flags) {
    extern __shared__ float fusion_smem[];
    const int r = blockIdx.x;
    if (r >= n) {
        return;  // uniform over the block
    }
    const int tid = threadIdx.x;
    const int nt = blockDim.x;
    float* red = fusion_smem;  // [32]
    float* sc = red + 32;      // [M] scores
    float* aw = sc + M;        // [M] attention weights
    float* tail = aw + M;
    float* yr = y + (size_t)r * D;
    float* z = (flags & FUSION_Z_IN_SHARED) ? tail : yr;
    float* hc = (flags & FUSION_H_IN_SHARED) ? tail + ((flags & FUSION_Z_IN_SHARED) ? D : 0) : 0;
    const unsigned char* mrow = mask + (size_t)r * M;

    // Pass 1: bias + tanh score of each present modality.
    for (int m = 0; m < M; ++m) {
        if (mrow[m] == 0) {
            continue;  // uniform over the block: the row is the block's
        }
        const H* hr = h + ((size_t)m * n + r) * D;
        const float* b = bias + (size_t)m * D;
        float acc = 0.0f;
        for (int d = tid; d < D; d += nt) {
            const float v = fusion_load_h(hr, d) + b[d];
            if (hc) {
                hc[(size_t)m * D + d] = v;
            }
            // A non-finite projection (NaN/Inf input, or f32 overflow) poisons the score with
            // NaN: the row's attention weights all come out NaN, which the host checks for
            // (tanh alone would map an Inf to a finite score).
            acc = fusion_is_finite(v) ? fmaf(gate[d], tanhf(v), acc) : __int_as_float(0x7fc00000);
        }
        const float s = fusion_block_sum(acc, red);
        if (tid == 0) {
            sc[m] = s;
        }
    }
    __syncthreads();

    // Pass 2: masked softmax over the M scores (M is small: each thread redoes the max and sum).
    for (int m = tid; m < M; m += nt) {
        float smax = __int_as_float(0xff800000);  // -inf
        for (int j = 0; j < M; ++j) {
            if (mrow[j]) {
                smax = fmaxf(smax, sc[j]);
            }
        }
        float sum = 0.0f;
        for (int j = 0; j < M; ++j) {
            if (mrow[j]) {
                sum += expf(sc[j] - smax);
            }
        }
        const float a = mrow[m] ? expf(sc[m] - smax) / sum : 0.0f;
        aw[m] = a;
        w[(size_t)r * M + m] = a;
    }
    __syncthreads();

    // Pass 3: weighted sum and its mean. Absent modalities have a == 0 exactly and are skipped,
    // so their (never validated, possibly NaN) projections are never read.
    float lsum = 0.0f;
    for (int d = tid; d < D; d += nt) {
        float zd = 0.0f;
        for (int m = 0; m < M; ++m) {
            const float a = aw[m];
            if (a != 0.0f) {
                const float v = hc ? hc[(size_t)m * D + d]
                                   : fusion_load_h(h, ((size_t)m * n + r) * D + d) +
                                         bias[(size_t)m * D + d];
                zd = fmaf(a, v, zd);
            }
        }
        z[d] = zd;
        lsum += zd;
    }
    const float mean = fusion_block_sum(lsum, red) / (float)D;

    // Pass 4: biased variance (two-pass), then normalise. Each thread touches only its own d's
    // of z, so z needs no barrier between passes.
    float lsq = 0.0f;
    for (int d = tid; d < D; d += nt) {
        const float t = z[d] - mean;
        lsq = fmaf(t, t, lsq);
    }
    const float var = fusion_block_sum(lsq, red) / (float)D;
    const float rstd = 1.0f / sqrtf(var + eps);
    for (int d = tid; d < D; d += nt) {
        yr[d] = fmaf((z[d] - mean) * rstd, gamma[d], beta[d]);
    }
}

// The block-per-row kernels, one per dtype of h; one parameter list for all (the host's argument
// block serves every epilogue).
#define FUSION_EPILOGUE_BLOCK(HT, DT)                                                            \
    extern "C" __global__ void fusion_epilogue_##DT(                                            \
        const HT* __restrict__ h, const float* __restrict__ bias,                               \
        const float* __restrict__ gate, const float* __restrict__ gamma,                        \
        const float* __restrict__ beta, const unsigned char* __restrict__ mask,                 \
        float* __restrict__ y, float* __restrict__ w, int n, int D, int M, float eps,           \
        int flags) {                                                                            \
        fusion_epilogue_block<HT>(h, bias, gate, gamma, beta, mask, y, w, n, D, M, eps, flags); \
    }
FUSION_EPILOGUE_BLOCK(float, f32)
FUSION_EPILOGUE_BLOCK(fusion_f16, f16)
FUSION_EPILOGUE_BLOCK(fusion_bf16, bf16)

// ---------------------------------------------------------------------------------------------
// Warp-per-row variant for D <= 32 * PER_LANE (the common case: every D up to 1024).
//
// One warp owns one sample row; lane l owns the elements d = l + 32 j (j < PER_LANE), so z, the
// current modality's v and every reduction stay in registers and warp shuffles: no block
// barrier, no shared memory but the M scores. The softmax is computed online while h is read
// (running max and sum; z rescaled when the max grows), so h is read exactly once and the row
// is written once. Same math and the same non-finite rule as fusion_epilogue_f32 (a non-finite
// present projection makes the row's weights NaN); one instantiation per dtype of h as well.
//
// Launch contract: grid = (ceil(n / W), 1, 1), block = (32 W, 1, 1),
// dynamic shared memory = 4 * W * M bytes; D <= 32 * PER_LANE.
template <int PER_LANE, typename H>
__device__ __forceinline__ void fusion_epilogue_warp(
    const H* __restrict__ h, const float* __restrict__ bias, const float* __restrict__ gate,
    const float* __restrict__ gamma, const float* __restrict__ beta,
    const unsigned char* __restrict__ mask, float* __restrict__ y, float* __restrict__ w, int n,
    int D, int M, float eps) {
    extern __shared__ float fusion_smem[];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int r = blockIdx.x * (blockDim.x >> 5) + warp;
    if (r >= n) {
        return;  // uniform over the warp; no block-wide barrier follows
    }
    float* sc = fusion_smem + (size_t)warp * M;
    const unsigned char* mrow = mask + (size_t)r * M;

    float z[PER_LANE];
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        z[j] = 0.0f;
    }
    float run_max = __int_as_float(0xff800000);  // -inf
    float run_sum = 0.0f;
    for (int m = 0; m < M; ++m) {
        if (mrow[m] == 0) {
            continue;  // uniform over the warp: the row is the warp's
        }
        const H* hr = h + ((size_t)m * n + r) * D;
        const float* b = bias + (size_t)m * D;
        float v[PER_LANE];
        float acc = 0.0f;
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            const int d = lane + 32 * j;
            v[j] = 0.0f;
            if (d < D) {
                const float t = fusion_load_h(hr, d) + b[d];
                v[j] = t;
                acc = fusion_is_finite(t) ? fmaf(gate[d], tanhf(t), acc)
                                          : __int_as_float(0x7fc00000);
            }
        }
        const float s = fusion_warp_sum(acc);
        if (lane == 0) {
            sc[m] = s;
        }
        // Online softmax: rescale what was summed so far to the new maximum. A NaN score makes
        // the scale (and so everything after it) NaN.
        const float new_max = fmaxf(run_max, s);
        const float scale = expf(run_max - new_max);
        const float e = expf(s - new_max);
        run_sum = fmaf(run_sum, scale, e);
#pragma unroll
        for (int j = 0; j < PER_LANE; ++j) {
            z[j] = fmaf(e, v[j], z[j] * scale);
        }
        run_max = new_max;
    }
    __syncwarp();  // sc[] written by lane 0 is read by the lanes below

    for (int m = lane; m < M; m += 32) {
        w[(size_t)r * M + m] = mrow[m] ? expf(sc[m] - run_max) / run_sum : 0.0f;
    }

    // z = sum_m a_m v_m, then LayerNorm (two-pass, biased variance).
    float lsum = 0.0f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        z[j] = z[j] / run_sum;
        if (lane + 32 * j < D) {
            lsum += z[j];
        }
    }
    const float mean = fusion_warp_sum(lsum) / (float)D;
    float lsq = 0.0f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        if (lane + 32 * j < D) {
            const float t = z[j] - mean;
            lsq = fmaf(t, t, lsq);
        }
    }
    const float var = fusion_warp_sum(lsq) / (float)D;
    const float rstd = 1.0f / sqrtf(var + eps);
    float* yr = y + (size_t)r * D;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        const int d = lane + 32 * j;
        if (d < D) {
            yr[d] = fmaf((z[j] - mean) * rstd, gamma[d], beta[d]);
        }
    }
}

// The instantiations the host picks from (smallest PER_LANE with D <= 32 * PER_LANE), per dtype
// of h. Same parameter list as fusion_epilogue_f32 (flags unused) so that one argument block
// serves all.
#define FUSION_EPILOGUE_WARP(PL, HT, DT)                                                         \
    extern "C" __global__ void __launch_bounds__(256) fusion_epilogue_warp##PL##_##DT(          \
        const HT* __restrict__ h, const float* __restrict__ bias,                               \
        const float* __restrict__ gate, const float* __restrict__ gamma,                        \
        const float* __restrict__ beta, const unsigned char* __restrict__ mask,                 \
        float* __restrict__ y, float* __restrict__ w, int n, int D, int M, float eps,           \
        int flags) {                                                                            \
        (void)flags;                                                                            \
        fusion_epilogue_warp<PL, HT>(h, bias, gate, gamma, beta, mask, y, w, n, D, M, eps);     \
    }
#define FUSION_EPILOGUE_WARP_ALL(PL)                                                             \
    FUSION_EPILOGUE_WARP(PL, float, f32)                                                        \
    FUSION_EPILOGUE_WARP(PL, fusion_f16, f16)                                                   \
    FUSION_EPILOGUE_WARP(PL, fusion_bf16, bf16)
FUSION_EPILOGUE_WARP_ALL(4)
FUSION_EPILOGUE_WARP_ALL(8)
FUSION_EPILOGUE_WARP_ALL(16)
FUSION_EPILOGUE_WARP_ALL(32)
