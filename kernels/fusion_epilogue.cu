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

// One half element of h as f32, from its bits. Elements at the top of their range (see the
// header) read as NaN.
__device__ __forceinline__ float fusion_h_value(fusion_f16, unsigned short b) {
    return ((b & 0x7fffu) >= 0x7bffu) ? __int_as_float(0x7fc00000) : fusion_f16_to_f32(b);
}
__device__ __forceinline__ float fusion_h_value(fusion_bf16, unsigned short b) {
    return ((b & 0x7fffu) >= 0x7f7fu) ? __int_as_float(0x7fc00000)
                                      : __uint_as_float((unsigned)b << 16);
}

// One element of h as f32.
__device__ __forceinline__ float fusion_load_h(const float* __restrict__ h, size_t i) {
    return h[i];
}
template <typename H>
__device__ __forceinline__ float fusion_load_h(const H* __restrict__ h, size_t i) {
    return fusion_h_value(H{}, h[i].bits);
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
// Warp-per-row variants for D <= 32 * PER_LANE (the common case: every D up to 1024).
//
// One warp owns one sample row; lane l owns PER_LANE elements of it, so z, the current
// modality's v and every reduction stay in registers and warp shuffles: no block barrier, no
// shared memory but the M scores. The softmax is computed online while h is read (running max
// and sum; z rescaled when the max grows), so h is read exactly once and the row is written
// once. Same math and the same non-finite rule as fusion_epilogue_f32 (a non-finite present
// projection makes the row's weights NaN); one instantiation per dtype of h as well.
//
// VEC is the elements one load brings: 1 (`warp`: lane l owns d = l + 32 j, one element a
// load) or 16 bytes' worth (`vec`: 4 f32 or 8 f16/bf16; lane l owns d = (l + 32 j) VEC + k,
// k < VEC, and reads h, bias, gate, gamma and beta in 16-byte loads). Either way the next
// present modality's h is loaded before the current one is computed, so that its loads are in
// flight meanwhile (a row's modalities would otherwise be fetched one after another).
//
// Launch contract: grid = (ceil(n / W), 1, 1), block = (32 W, 1, 1),
// dynamic shared memory = 4 * W * M bytes; D <= 32 * PER_LANE. For VEC > 1 also D % VEC == 0
// and h, bias, gate, gamma, beta and y 16-byte aligned (every row then is).

// 16 bytes, one load.
struct alignas(16) fusion_vec16 {
    unsigned w[4];
};

// A lane's share of one row of h as loaded, unpacked only when used.
template <int PER_LANE, int VEC, typename H>
struct fusion_lane_row {
    H e[VEC == 1 ? PER_LANE : 1];                   // VEC == 1: the elements as stored
    fusion_vec16 q[VEC == 1 ? 1 : PER_LANE / VEC];  // else: 16-byte vectors
};

// Element j (< PER_LANE) of the lane's share is d = fusion_lane_d<VEC>(lane, j).
template <int VEC>
__device__ __forceinline__ int fusion_lane_d(int lane, int j) {
    return (lane + 32 * (j / VEC)) * VEC + j % VEC;
}

template <int PER_LANE, int VEC, typename H>
__device__ __forceinline__ void fusion_load_row(fusion_lane_row<PER_LANE, VEC, H>& raw,
                                                const H* __restrict__ hr, int lane, int D) {
#pragma unroll
    for (int j = 0; j < (VEC == 1 ? PER_LANE : PER_LANE / VEC); ++j) {
        const int d = (lane + 32 * j) * VEC;
        if (d < D) {
            if constexpr (VEC == 1) {
                raw.e[j] = hr[d];
            } else {
                raw.q[j] = *reinterpret_cast<const fusion_vec16*>(hr + d);
            }
        }
    }
}

// Element j of the lane's share, as f32.
template <int PER_LANE, int VEC, typename H>
__device__ __forceinline__ float fusion_row_value(const fusion_lane_row<PER_LANE, VEC, H>& raw,
                                                  int j) {
    if constexpr (VEC == 1) {
        return fusion_load_h(raw.e, j);
    } else if constexpr (sizeof(H) == 4) {
        return __uint_as_float(raw.q[j / VEC].w[j % VEC]);
    } else {
        const unsigned word = raw.q[j / VEC].w[(j % VEC) / 2];
        return fusion_h_value(H{}, (unsigned short)((j & 1) ? word >> 16 : word & 0xffffu));
    }
}

// p[d .. d + VEC) of an f32 parameter vector (16-byte loads when VEC > 1).
template <int VEC>
__device__ __forceinline__ void fusion_load_f32(const float* __restrict__ p, int d, float* out) {
    if constexpr (VEC == 1) {
        out[0] = p[d];
    } else {
#pragma unroll
        for (int i = 0; i < VEC / 4; ++i) {
            const fusion_vec16 q = *reinterpret_cast<const fusion_vec16*>(p + d + 4 * i);
#pragma unroll
            for (int k = 0; k < 4; ++k) {
                out[4 * i + k] = __uint_as_float(q.w[k]);
            }
        }
    }
}

template <int PER_LANE, int VEC, typename H>
__device__ __forceinline__ void fusion_epilogue_warp(
    const H* __restrict__ h, const float* __restrict__ bias, const float* __restrict__ gate,
    const float* __restrict__ gamma, const float* __restrict__ beta,
    const unsigned char* __restrict__ mask, float* __restrict__ y, float* __restrict__ w, int n,
    int D, int M, float eps) {
    static_assert(PER_LANE % VEC == 0, "whole vectors per lane");
    constexpr int NV = PER_LANE / VEC;  // loads per lane per row
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
    int m = 0;
    while (m < M && mrow[m] == 0) {
        ++m;  // uniform over the warp: the row is the warp's
    }
    fusion_lane_row<PER_LANE, VEC, H> cur{};
    if (m < M) {
        fusion_load_row(cur, h + ((size_t)m * n + r) * D, lane, D);
    }
    while (m < M) {
        int next = m + 1;
        while (next < M && mrow[next] == 0) {
            ++next;
        }
        fusion_lane_row<PER_LANE, VEC, H> ahead{};
        if (next < M) {
            fusion_load_row(ahead, h + ((size_t)next * n + r) * D, lane, D);
        }
        const float* b = bias + (size_t)m * D;
        float v[PER_LANE];
        float acc = 0.0f;
#pragma unroll
        for (int jv = 0; jv < NV; ++jv) {
            const int d0 = (lane + 32 * jv) * VEC;
            if (d0 < D) {
                float bv[VEC], gv[VEC];
                fusion_load_f32<VEC>(b, d0, bv);
                fusion_load_f32<VEC>(gate, d0, gv);
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    const int j = jv * VEC + k;
                    const float t = fusion_row_value(cur, j) + bv[k];
                    v[j] = t;
                    acc = fusion_is_finite(t) ? fmaf(gv[k], tanhf(t), acc)
                                              : __int_as_float(0x7fc00000);
                }
            } else {
#pragma unroll
                for (int k = 0; k < VEC; ++k) {
                    v[jv * VEC + k] = 0.0f;
                }
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
        cur = ahead;
        m = next;
    }
    __syncwarp();  // sc[] written by lane 0 is read by the lanes below

    for (int mm = lane; mm < M; mm += 32) {
        w[(size_t)r * M + mm] = mrow[mm] ? expf(sc[mm] - run_max) / run_sum : 0.0f;
    }

    // z = sum_m a_m v_m, then LayerNorm (two-pass, biased variance).
    float lsum = 0.0f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        z[j] = z[j] / run_sum;
        if (fusion_lane_d<VEC>(lane, j) < D) {
            lsum += z[j];
        }
    }
    const float mean = fusion_warp_sum(lsum) / (float)D;
    float lsq = 0.0f;
#pragma unroll
    for (int j = 0; j < PER_LANE; ++j) {
        if (fusion_lane_d<VEC>(lane, j) < D) {
            const float t = z[j] - mean;
            lsq = fmaf(t, t, lsq);
        }
    }
    const float var = fusion_warp_sum(lsq) / (float)D;
    const float rstd = 1.0f / sqrtf(var + eps);
    float* yr = y + (size_t)r * D;
#pragma unroll
    for (int jv = 0; jv < NV; ++jv) {
        const int d0 = (lane + 32 * jv) * VEC;
        if (d0 < D) {
            float ga[VEC], be[VEC], out[VEC];
            fusion_load_f32<VEC>(gamma, d0, ga);
            fusion_load_f32<VEC>(beta, d0, be);
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
                out[k] = fmaf((z[jv * VEC + k] - mean) * rstd, ga[k], be[k]);
            }
            if constexpr (VEC == 1) {
                yr[d0] = out[0];
            } else {
#pragma unroll
                for (int i = 0; i < VEC / 4; ++i) {
                    fusion_vec16 q;
#pragma unroll
                    for (int k = 0; k < 4; ++k) {
                        q.w[k] = __float_as_uint(out[4 * i + k]);
                    }
                    *reinterpret_cast<fusion_vec16*>(yr + d0 + 4 * i) = q;
                }
            }
        }
    }
}

// The instantiations the host picks from (smallest PER_LANE with D <= 32 * PER_LANE), per dtype
// of h: `warp<PL>` one element a load, `vec<PL>` 16 bytes a load (PER_LANE 8 or more, so that
// a lane holds whole vectors of every dtype). Same parameter list as fusion_epilogue_f32 (flags
// unused) so that one argument block serves all.
#define FUSION_EPILOGUE_WARP(NAME, PL, VEC, HT, DT)                                              \
    extern "C" __global__ void __launch_bounds__(256) fusion_epilogue_##NAME##PL##_##DT(        \
        const HT* __restrict__ h, const float* __restrict__ bias,                               \
        const float* __restrict__ gate, const float* __restrict__ gamma,                        \
        const float* __restrict__ beta, const unsigned char* __restrict__ mask,                 \
        float* __restrict__ y, float* __restrict__ w, int n, int D, int M, float eps,           \
        int flags) {                                                                            \
        (void)flags;                                                                            \
        fusion_epilogue_warp<PL, VEC, HT>(h, bias, gate, gamma, beta, mask, y, w, n, D, M,      \
                                          eps);                                                 \
    }
#define FUSION_EPILOGUE_WARP_ALL(PL)                                                             \
    FUSION_EPILOGUE_WARP(warp, PL, 1, float, f32)                                               \
    FUSION_EPILOGUE_WARP(warp, PL, 1, fusion_f16, f16)                                          \
    FUSION_EPILOGUE_WARP(warp, PL, 1, fusion_bf16, bf16)
#define FUSION_EPILOGUE_VEC_ALL(PL)                                                              \
    FUSION_EPILOGUE_WARP(vec, PL, 4, float, f32)                                                \
    FUSION_EPILOGUE_WARP(vec, PL, 8, fusion_f16, f16)                                           \
    FUSION_EPILOGUE_WARP(vec, PL, 8, fusion_bf16, bf16)
FUSION_EPILOGUE_WARP_ALL(4)
FUSION_EPILOGUE_WARP_ALL(8)
FUSION_EPILOGUE_WARP_ALL(16)
FUSION_EPILOGUE_WARP_ALL(32)
FUSION_EPILOGUE_VEC_ALL(8)
FUSION_EPILOGUE_VEC_ALL(16)
FUSION_EPILOGUE_VEC_ALL(32)
