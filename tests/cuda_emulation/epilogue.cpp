// Host emulation of kernels/fusion_epilogue.cu, for checking the kernels' logic without a GPU
// (tests/cuda_emulation.rs compiles and runs it with g++ -std=c++20).
//
// The .cu file is compiled as plain C++: the CUDA qualifiers become no-ops, every CUDA thread of
// a block is an OS thread, __syncthreads is a block-wide std::barrier, and __syncwarp and
// __shfl_xor_sync are a per-warp barrier (the shuffle exchanges through a per-warp array between
// two barriers). Blocks run one after another on the same threads; dynamic shared memory is one
// array the block's threads share. Half values are raw bits (the kernel's own structs); the
// kernel widens f16 with integer arithmetic here and with the GPU's cvt instruction on a GPU
// (the one line this cannot check). Checked, against double-precision references:
//   - the f16/bf16 converters (every f16 value; rounding against the compiler's _Float16);
//   - every epilogue (block-per-row with each shared-memory flag combination, warp-per-row one
//     element a load and 16 bytes a load where D allows: a multiple of 4 f32, 8 f16/bf16) for
//     each dtype of h, on random projections as stored, with a NaN in a present projection (the
//     row's weights must come out NaN, absent ones 0) and an Inf in an absent one (never read);
//   - the whole head on fresh random inputs (seed from argv[1]) with the GEMM emulated as cuBLAS
//     runs it for half inputs (operands in f16/bf16, f32 accumulation, h rounded once to the
//     input dtype): fused and weights within 1e-2 (docs/DESIGN.md section 2.4);
//   - h at the top of f16's range: |h| up to 5e4 still within 1e-2; an overflow to Inf, a
//     saturated 65504 and bf16's largest value give the row NaN weights (the host's signal to
//     recompute with f32 h) and leave the other rows right.
// It cannot check GPU-only matters (launch limits, timing, CUDA's own tanhf/expf, cuBLAS itself),
// which tests/cuda_backend.rs covers on a real GPU.
#include <barrier>
#include <cstdlib>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <vector>
#include <functional>
#include <memory>
#include <utility>

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__ __restrict
#define __launch_bounds__(x)
#define __shared__
struct Dim3 { unsigned x = 0, y = 0, z = 0; };
thread_local Dim3 threadIdx, blockIdx;
Dim3 blockDim;
float fusion_smem[1 << 16];
struct Warp { std::barrier<>* bar; float slot[32]; };
thread_local Warp* my_warp;
thread_local int my_lane;
std::barrier<>* block_bar;
static inline unsigned __float_as_uint(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static inline float __int_as_float(int i) { float f; memcpy(&f, &i, 4); return f; }
static inline float __uint_as_float(unsigned u) { float f; memcpy(&f, &u, 4); return f; }
static inline float __shfl_xor_sync(unsigned, float v, int o) {
    my_warp->slot[my_lane] = v; my_warp->bar->arrive_and_wait();
    float r = my_warp->slot[my_lane ^ o]; my_warp->bar->arrive_and_wait(); return r;
}
static inline void __syncwarp() { my_warp->bar->arrive_and_wait(); }
static inline void __syncthreads() { block_bar->arrive_and_wait(); }

#include "fusion_epilogue.cu"


// Runs `body` as `grid` blocks of `block` threads: one OS thread per CUDA thread, walking the
// blocks in order with a barrier between blocks (blocks never overlap; shared memory is reused).
// A kernel returns early only for a whole block or warp, so every barrier still completes.
void launch(unsigned grid, unsigned block, const std::function<void()>& body) {
    blockDim.x = block;
    std::barrier<> bbar(block), next(block);
    block_bar = &bbar;
    std::vector<std::unique_ptr<std::barrier<>>> wb;
    std::vector<Warp> warps(block / 32);
    for (unsigned wi = 0; wi < block / 32; ++wi) { wb.emplace_back(new std::barrier<>(32)); warps[wi].bar = wb.back().get(); }
    std::vector<std::thread> ts;
    for (unsigned t = 0; t < block; ++t) {
        ts.emplace_back([&, t] {
            threadIdx.x = t; my_warp = &warps[t / 32]; my_lane = t % 32;
            for (unsigned bi = 0; bi < grid; ++bi) {
                blockIdx.x = bi;
                body();
                next.arrive_and_wait();
            }
        });
    }
    for (auto& t : ts) t.join();
}

// ---- Half precision on the host: what the GEMM writes (round to nearest even, overflow to Inf).
static unsigned f32_bits(float f) { unsigned u; memcpy(&u, &f, 4); return u; }
static unsigned short to_f16(float f) {
    const unsigned x = f32_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return sign | 0x7e00u;           // NaN
    if (ax >= 0x477ff000u) return sign | 0x7c00u;          // >= 65520: Inf
    if (ax < 0x38800000u) {                                // below 2^-14: subnormal or zero
        return sign | (unsigned short)std::nearbyint(std::fabs(f) * 16777216.0f);
    }
    unsigned h = (((ax >> 23) - 112u) << 10) | ((ax & 0x7fffffu) >> 13);
    const unsigned rem = ax & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) ++h;
    return sign | h;
}
static unsigned short to_bf16(float f) {
    unsigned x = f32_bits(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return (x >> 16) | 0x40u;
    x += 0x7fffu + ((x >> 16) & 1u);
    return x >> 16;
}
enum HT { F32, F16, BF16 };
const char* ht_name[] = {"f32", "f16", "bf16"};
// h as the GEMM leaves it in dtype t, and the values it stands for.
struct Hbuf {
    std::vector<float> f32; std::vector<fusion_f16> f16; std::vector<fusion_bf16> bf16;
    std::vector<float> stored;
    Hbuf(HT t, const std::vector<float>& h) : stored(h) {
        if (t == F32) { f32 = h; return; }
        for (size_t i = 0; i < h.size(); ++i) {
            if (t == F16) { f16.push_back({to_f16(h[i])}); stored[i] = fusion_f16_to_f32(f16.back().bits); }
            else { bf16.push_back({to_bf16(h[i])}); stored[i] = __uint_as_float((unsigned)bf16.back().bits << 16); }
        }
    }
};
// Independent checks of the converters: every f16 against its definition and a round trip,
// the rounding against the compiler's _Float16 where it has one.
static bool conversions_ok() {
    for (unsigned b = 0; b < 0x10000u; ++b) {
        const unsigned e = (b >> 10) & 0x1fu, m = b & 0x3ffu;
        const double mag = e == 0x1f ? (m ? NAN : INFINITY) : e ? std::ldexp(1.0 + m / 1024.0, (int)e - 15) : std::ldexp((double)m, -24);
        const double want = (b & 0x8000u) ? -mag : mag;
        const float got = fusion_f16_to_f32((unsigned short)b);
        if (std::isnan(want) ? !std::isnan(got) : (double)got != want) { printf("f16 %04x -> %g, want %g\n", b, got, want); return false; }
        if (!std::isnan(want) && to_f16(got) != b) { printf("f16 %04x round trip gives %04x\n", b, to_f16(got)); return false; }
    }
#ifdef __FLT16_MAX__
    std::mt19937 rng(1);
    for (int i = 0; i < 2000000; ++i) {
        unsigned u = rng(); float f; memcpy(&f, &u, 4);
        if (std::isnan(f)) continue;
        _Float16 c = (_Float16)f; unsigned short cb; memcpy(&cb, &c, 2);
        if (cb != to_f16(f)) { printf("to_f16(%g) = %04x, _Float16 %04x\n", f, to_f16(f), cb); return false; }
    }
#endif
    return to_bf16(1.0f) == 0x3f80u && to_bf16(3.4e38f) == 0x7f80u && to_bf16(-1.00390625f) == 0xbf80u &&
           to_bf16(1.01171875f) == 0x3f82u;
}

// ---- The head's epilogue parameters, and the float64 reference from projections (no bias).
struct Head { int D, M; float eps; std::vector<float> b, g, ga, be; };
static Head random_head(std::mt19937& rng, int D, int M, const std::vector<int>& k) {
    // Like FusionHead::random (src/model.rs): bias +-1/sqrt(k), gate +-4/sqrt(D).
    Head hd{D, M, 1e-5f, std::vector<float>((size_t)M * D), std::vector<float>(D), std::vector<float>(D), std::vector<float>(D)};
    auto u = [&](float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); };
    for (int m = 0; m < M; ++m) for (int d = 0; d < D; ++d) { float bb = 1 / std::sqrt((float)k[m]); hd.b[(size_t)m*D+d] = u(-bb, bb); }
    for (auto& x : hd.g) x = u(-4 / std::sqrt((float)D), 4 / std::sqrt((float)D));
    for (auto& x : hd.ga) x = u(0.5f, 1.5f);
    for (auto& x : hd.be) x = u(-0.1f, 0.1f);
    return hd;
}
static void reference(const Head& hd, const std::vector<double>& h, const std::vector<unsigned char>& mask, int n,
                      std::vector<double>& ry, std::vector<double>& rw) {
    const int D = hd.D, M = hd.M;
    ry.assign((size_t)n * D, 0); rw.assign((size_t)n * M, 0);
    for (int r = 0; r < n; ++r) {
        std::vector<double> s(M), a(M, 0.0); double mx = -INFINITY;
        auto v = [&](int m, int d) { return h[((size_t)m*n+r)*D+d] + hd.b[(size_t)m*D+d]; };
        for (int m = 0; m < M; ++m) if (mask[r*M+m]) { double acc = 0; for (int d = 0; d < D; ++d) acc += hd.g[d]*std::tanh(v(m, d)); s[m] = acc; mx = std::max(mx, acc); }
        double sum = 0; for (int m = 0; m < M; ++m) if (mask[r*M+m]) sum += std::exp(s[m]-mx);
        for (int m = 0; m < M; ++m) if (mask[r*M+m]) a[m] = std::exp(s[m]-mx)/sum;
        std::vector<double> z(D, 0.0); for (int m = 0; m < M; ++m) if (a[m] != 0) for (int d = 0; d < D; ++d) z[d] += a[m]*v(m, d);
        double mean = 0; for (double x : z) mean += x; mean /= D; double var = 0; for (double x : z) var += (x-mean)*(x-mean); var /= D;
        for (int d = 0; d < D; ++d) ry[(size_t)r*D+d] = (z[d]-mean)/std::sqrt(var+hd.eps)*hd.ga[d]+hd.be[d];
        for (int m = 0; m < M; ++m) rw[r*M+m] = a[m];
    }
}
static std::vector<unsigned char> random_mask(std::mt19937& rng, int n, int M) {
    std::vector<unsigned char> mask((size_t)n * M);
    for (int r = 0; r < n; ++r) { bool any = false; for (int m = 0; m < M; ++m) { mask[r*M+m] = rng() % 3 != 0; any |= mask[r*M+m]; } if (!any) mask[r*M + r % M] = 1; }
    return mask;
}

// ---- One launch of an epilogue variant: pl = 0 is block-per-row (block threads, flags), pl > 0
// the warp-per-row kernel with PER_LANE = pl, pl < 0 the 16-byte-load one (`vec`) with
// PER_LANE = -pl (both 8 rows of 256 threads per block).
struct Out { std::vector<float> y, w; };
static Out run(HT t, int pl, unsigned block, int flags, const Hbuf& h, const Head& hd,
               const std::vector<unsigned char>& mask, int n) {
    Out o{std::vector<float>((size_t)n * hd.D, -7.f), std::vector<float>((size_t)n * hd.M, -7.f)};
    const int D = hd.D, M = hd.M;
    const float eps = hd.eps;
#define CALL(K, HP) K(HP, hd.b.data(), hd.g.data(), hd.ga.data(), hd.be.data(), mask.data(), o.y.data(), o.w.data(), n, D, M, eps, flags)
#define DISPATCH(DT, HP) switch (pl) { \
        case 0: CALL(fusion_epilogue_##DT, HP); break; case 4: CALL(fusion_epilogue_warp4_##DT, HP); break; \
        case 8: CALL(fusion_epilogue_warp8_##DT, HP); break; case 16: CALL(fusion_epilogue_warp16_##DT, HP); break; \
        case 32: CALL(fusion_epilogue_warp32_##DT, HP); break; case -8: CALL(fusion_epilogue_vec8_##DT, HP); break; \
        case -16: CALL(fusion_epilogue_vec16_##DT, HP); break; default: CALL(fusion_epilogue_vec32_##DT, HP); }
    const unsigned rows = pl ? 8 : 1, threads = pl ? 256 : block;
    launch((n + rows - 1) / rows, threads, [&] {
        if (t == F32) { DISPATCH(f32, h.f32.data()) }
        else if (t == F16) { DISPATCH(f16, h.f16.data()) }
        else { DISPATCH(bf16, h.bf16.data()) }
    });
    return o;
}
static int per_lane(int D) { return D <= 128 ? 4 : D <= 256 ? 8 : D <= 512 ? 16 : 32; }
// The `vec` variant's pl for D in dtype t (negative, see run()), or 0 when its contract does not
// hold (D a multiple of the elements one 16-byte load brings: 4 f32, 8 f16/bf16).
static int vec_pl(HT t, int D) { return D % (t == F32 ? 4 : 8) ? 0 : -(D <= 256 ? 8 : D <= 512 ? 16 : 32); }
// Block-per-row, warp-per-row and, where D fits it, vec.
static std::vector<int> kinds(HT t, int D) {
    std::vector<int> k = {0, per_lane(D)};
    if (vec_pl(t, D)) k.push_back(vec_pl(t, D));
    return k;
}
static const char* kind_name(int pl) { return pl == 0 ? "block" : pl > 0 ? "warp" : "vec"; }
// ||out - ref|| / ||ref|| over `rows` (docs/DESIGN.md section 2.4); a non-finite value fails.
static double rel_err(const std::vector<float>& o, const std::vector<double>& r, int width, const std::vector<int>& rows) {
    double num = 0, den = 0;
    for (int row : rows) for (int c = 0; c < width; ++c) {
        const double x = o[(size_t)row*width+c], y = r[(size_t)row*width+c];
        if (!std::isfinite(x)) return INFINITY;
        num += (x-y)*(x-y); den += y*y;
    }
    return std::sqrt(num) / (den > 0 ? std::sqrt(den) : 1.0);
}
// True when every present weight of `row` is NaN and every absent one is 0.
static bool nan_row(const Out& o, const std::vector<unsigned char>& mask, int row, int M) {
    for (int m = 0; m < M; ++m) {
        const float x = o.w[row*M+m];
        if (mask[row*M+m] ? !std::isnan(x) : x != 0.f) return false;
    }
    return true;
}

int fails = 0;
static void verdict(bool ok, const char* fmt_line) { fails += !ok; printf("%s %s\n", fmt_line, ok ? "ok" : "FAIL"); }

// Part A: every variant, for every dtype of h, on random projections exactly as stored (the
// reference reads the same rounded values, so f32 bounds apply), with a NaN in a present
// projection (that row's weights must be NaN, absent ones 0) and an Inf in an absent one.
static void variants(std::mt19937& rng) {
    std::normal_distribution<float> nd(0.f, 1.f);
    const std::pair<int, int> shapes[] = {{512, 3}, {512, 1}, {200, 3}, {256, 5}, {257, 3},
                                          {33, 5},  {8, 1},   {1024, 3}, {100, 2}, {64, 40}};
    for (auto [D, M] : shapes) {
        const int n = 19;
        Head hd{D, M, 1e-5f, std::vector<float>((size_t)M * D), std::vector<float>(D), std::vector<float>(D), std::vector<float>(D)};
        std::vector<float> h((size_t)M * n * D);
        for (auto& x : h) x = nd(rng) * 2;
        for (auto& x : hd.b) x = nd(rng) * 0.1f;
        for (auto& x : hd.g) x = nd(rng) * 0.3f;
        for (auto& x : hd.ga) x = 1 + nd(rng) * 0.1f;
        for (auto& x : hd.be) x = nd(rng) * 0.1f;
        auto mask = random_mask(rng, n, M);
        const int bad_row = 5, absent_row = 9;
        { int m = 0; while (!mask[bad_row*M+m]) ++m; h[((size_t)m*n+bad_row)*D + D/2] = NAN; }
        if (M > 1) { mask[absent_row*M+0] = 0; mask[absent_row*M+1] = 1; h[((size_t)0*n+absent_row)*D] = INFINITY; }
        std::vector<int> good; for (int r = 0; r < n; ++r) if (r != bad_row) good.push_back(r);
        // Half h on the shapes that reach every warp variant (PER_LANE 4, 8, 16, 32) and M = 1.
        const bool half_too = (D == 1024 && M == 3) || (D == 200 && M == 3) || (D == 33 && M == 5) || (D == 512 && M == 1);
        for (HT t : {F32, F16, BF16}) {
            if (t != F32 && !half_too) continue;
            Hbuf hb(t, h);
            std::vector<double> hs(hb.stored.begin(), hb.stored.end()), ry, rw;
            reference(hd, hs, mask, n, ry, rw);
            struct V { const char* name; int pl; unsigned block; int flags; };
            char warp_name[16], vec_name[16];
            snprintf(warp_name, sizeof warp_name, "warp%d", per_lane(D));
            snprintf(vec_name, sizeof vec_name, "vec%d", -vec_pl(t, D));
            const V vs[] = {{"block(z,h shared)", 0, 128, 3}, {"block(z shared)", 0, 96, 1},
                            {"block(no shared)", 0, 64, 0}, {warp_name, per_lane(D), 256, 0},
                            {vec_name, vec_pl(t, D), 256, 0}};
            for (const V& v : vs) {
                if (v.name == vec_name && v.pl == 0) continue;  // D does not fit 16-byte loads
                Out o = run(t, v.pl, v.block, v.flags, hb, hd, mask, n);
                double ey = 0, ew = 0;
                for (int r : good) {
                    for (int m = 0; m < M; ++m) ew = std::max(ew, std::fabs(o.w[r*M+m] - rw[r*M+m]));
                    for (int d = 0; d < D; ++d) { float x = o.y[(size_t)r*D+d]; ey = std::max(ey, std::isfinite(x) ? std::fabs(x - ry[(size_t)r*D+d]) : 1e9); }
                }
                const bool nan_ok = nan_row(o, mask, bad_row, M);
                char line[200];
                snprintf(line, sizeof line, "h=%-4s D=%4d M=%d %-18s fused err %.2e weights err %.2e nan-row %s", ht_name[t], D, M, v.name, ey, ew, nan_ok ? "ok" : "WRONG");
                verdict(ey < 1e-4 && ew < 1e-5 && nan_ok, line);
            }
        }
    }
}

// A GEMM as cuBLAS runs it for an input of dtype t: operands in t (the weights converted to t,
// as src/backend/cuda/weights.rs does), f32 accumulation, output rounded once to t.
static std::vector<float> gemm(HT t, const std::vector<std::vector<float>>& x, const std::vector<std::vector<float>>& W,
                               const std::vector<int>& k, int n, int D) {
    auto op = [&](float v) { return t == F16 ? fusion_f16_to_f32(to_f16(v)) : t == BF16 ? __uint_as_float((unsigned)to_bf16(v) << 16) : v; };
    std::vector<float> h((size_t)k.size() * n * D);
    for (size_t m = 0; m < k.size(); ++m) {
        std::vector<float> w(W[m].size()); for (size_t i = 0; i < w.size(); ++i) w[i] = op(W[m][i]);
        for (int r = 0; r < n; ++r) for (int d = 0; d < D; ++d) {
            float acc = 0; for (int c = 0; c < k[m]; ++c) acc = std::fma(w[(size_t)d*k[m]+c], x[m][(size_t)r*k[m]+c], acc);
            h[((size_t)m*n+r)*D+d] = acc;
        }
    }
    return h;
}
// The float64 projections the reference uses: the stored inputs and the head's own weights.
static std::vector<double> exact_h(const std::vector<std::vector<float>>& x, const std::vector<std::vector<float>>& W,
                                   const std::vector<int>& k, int n, int D) {
    std::vector<double> h((size_t)k.size() * n * D);
    for (size_t m = 0; m < k.size(); ++m) for (int r = 0; r < n; ++r) for (int d = 0; d < D; ++d) {
        double acc = 0; for (int c = 0; c < k[m]; ++c) acc += (double)W[m][(size_t)d*k[m]+c] * x[m][(size_t)r*k[m]+c];
        h[((size_t)m*n+r)*D+d] = acc;
    }
    return h;
}
// Random inputs (standard normal, stored in t) and weights (+-1/sqrt(k), stored in t when
// half_weights, else f32), like src/selftest.rs and FusionHead::random.
struct Problem { std::vector<std::vector<float>> x, W; };
static Problem random_problem(std::mt19937& rng, HT t, bool half_weights, const std::vector<int>& k, int n, int D) {
    auto store = [&](float v) { return t == F16 ? fusion_f16_to_f32(to_f16(v)) : __uint_as_float((unsigned)to_bf16(v) << 16); };
    std::normal_distribution<float> nd(0.f, 1.f);
    Problem p;
    for (int km : k) {
        std::vector<float> x((size_t)n * km), W((size_t)D * km);
        for (auto& v : x) v = store(nd(rng));
        const float bb = 1 / std::sqrt((float)km);
        for (auto& v : W) { v = std::uniform_real_distribution<float>(-bb, bb)(rng); if (half_weights) v = store(v); }
        p.x.push_back(std::move(x)); p.W.push_back(std::move(W));
    }
    return p;
}

// Part B: the whole head with half h on fresh random inputs (seeded from the command line),
// against the float64 reference: within 1e-2 (docs/DESIGN.md section 2.4). The f32-h path's
// error on the same problem is printed alongside.
static void whole_head(unsigned seed) {
    std::mt19937 rng(seed);
    struct Shape { std::vector<int> k; int D, n; };
    const Shape shapes[] = {{{1024, 768, 128}, 512, 16}, {{37, 5, 129}, 67, 33}};
    for (const Shape& s : shapes) for (HT t : {F16, BF16}) for (bool hw : {false, true}) {
        const int M = (int)s.k.size();
        Head hd = random_head(rng, s.D, M, s.k);
        Problem p = random_problem(rng, t, hw, s.k, s.n, s.D);
        auto mask = random_mask(rng, s.n, M);
        std::vector<double> ry, rw;
        reference(hd, exact_h(p.x, p.W, s.k, s.n, s.D), mask, s.n, ry, rw);
        std::vector<float> h = gemm(t, p.x, p.W, s.k, s.n, s.D);
        Hbuf half(t, h), full(F32, h);
        std::vector<int> all(s.n); for (int r = 0; r < s.n; ++r) all[r] = r;
        for (int pl : kinds(t, s.D)) {
            Out o = run(t, pl, 128, 3, half, hd, mask, s.n), o32 = run(F32, pl, 128, 3, full, hd, mask, s.n);
            const double ey = rel_err(o.y, ry, s.D, all), ew = rel_err(o.w, rw, M, all);
            char line[240];
            snprintf(line, sizeof line, "whole head %-4s inputs, %s weights, D=%d M=%d %-5s: fused %.2e weights %.2e (f32 h: %.2e %.2e)",
                     ht_name[t], hw ? ht_name[t] : "f32", s.D, M, kind_name(pl), ey, ew, rel_err(o32.y, ry, s.D, all), rel_err(o32.w, rw, M, all));
            verdict(ey <= 1e-2 && ew <= 1e-2, line);
        }
    }
}

// Part C: magnitudes at the top of f16's range. (1) Projections up to ~5e4 (inputs and weights
// scaled up): still within 1e-2. (2) One row's projection past 65504: the GEMM's Inf makes that
// row's weights NaN and leaves the other rows right (the host then recomputes with f32 h).
// (3) A saturating GEMM's 65504 and a bf16 h at its largest finite value count as overflow too.
static void edges(unsigned seed) {
    std::mt19937 rng(seed + 1);
    const std::vector<int> k = {256, 128};
    const int D = 128, n = 24, M = 2;
    Head hd = random_head(rng, D, M, k);
    // f16 weights: the GEMM's operands are exactly the reference's, so only h's rounding differs.
    Problem p = random_problem(rng, F16, true, k, n, D);
    auto mask = random_mask(rng, n, M);
    std::vector<float> h0 = gemm(F16, p.x, p.W, k, n, D);
    float mx = 0; for (float v : h0) mx = std::max(mx, std::fabs(v));
    const float s = std::sqrt(50000.f / mx);
    for (auto& x : p.x) for (auto& v : x) v = fusion_f16_to_f32(to_f16(v * s));
    for (auto& w : p.W) for (auto& v : w) v = fusion_f16_to_f32(to_f16(v * s));
    std::vector<float> h = gemm(F16, p.x, p.W, k, n, D);
    mx = 0; for (float v : h) mx = std::max(mx, std::fabs(v));
    std::vector<double> ry, rw;
    reference(hd, exact_h(p.x, p.W, k, n, D), mask, n, ry, rw);
    std::vector<int> all(n); for (int r = 0; r < n; ++r) all[r] = r;
    const int over = 3, sat = 7;
    {   // scale one present projection of row `over` to a maximum of 8e4
        int m = 0; while (!mask[over*M+m]) ++m;
        float* row = &h[((size_t)m*n+over)*D];
        float rm = 0; for (int d = 0; d < D; ++d) rm = std::max(rm, std::fabs(row[d]));
        for (int d = 0; d < D; ++d) row[d] *= 8e4f / rm;
    }
    std::vector<int> rest; for (int r = 0; r < n; ++r) if (r != over && r != sat) rest.push_back(r);
    for (int pl : kinds(F16, D)) {
        const char* kind = kind_name(pl);
        Hbuf big(F16, gemm(F16, p.x, p.W, k, n, D));
        Out o = run(F16, pl, 128, 3, big, hd, mask, n);
        Out o32 = run(F32, pl, 128, 3, Hbuf(F32, gemm(F16, p.x, p.W, k, n, D)), hd, mask, n);
        char line[240];
        snprintf(line, sizeof line, "edge f16 max|h| %.0f %-5s: fused %.2e weights %.2e (f32 h: %.2e %.2e)", mx, kind, rel_err(o.y, ry, D, all),
                 rel_err(o.w, rw, M, all), rel_err(o32.y, ry, D, all), rel_err(o32.w, rw, M, all));
        verdict(mx > 3e4f && mx < 65504.f && rel_err(o.y, ry, D, all) <= 1e-2 && rel_err(o.w, rw, M, all) <= 1e-2, line);
        Hbuf ov(F16, h);
        { int m = 0; while (!mask[sat*M+m]) ++m; ov.f16[((size_t)m*n+sat)*D + 1].bits = 0x7bffu; }  // saturated 65504
        int infs = 0; for (auto& b : ov.f16) infs += (b.bits & 0x7fffu) == 0x7c00u;
        o = run(F16, pl, 128, 3, ov, hd, mask, n);
        snprintf(line, sizeof line, "edge f16 overflow %-5s: %d Inf in h, rows %d (Inf) and %d (65504) NaN weights %s, other rows fused %.2e",
                 kind, infs, over, sat, nan_row(o, mask, over, M) && nan_row(o, mask, sat, M) ? "yes" : "NO", rel_err(o.y, ry, D, rest));
        verdict(infs > 0 && nan_row(o, mask, over, M) && nan_row(o, mask, sat, M) && rel_err(o.y, ry, D, rest) <= 1e-2 && rel_err(o.w, rw, M, rest) <= 1e-2, line);
        Hbuf bh(BF16, h0);
        { int m = 0; while (!mask[sat*M+m]) ++m; bh.bf16[((size_t)m*n+sat)*D].bits = 0xff7fu; }  // -bf16 max
        { int m = 0; while (!mask[over*M+m]) ++m; bh.bf16[((size_t)m*n+over)*D].bits = 0x7f80u; }  // +Inf
        o = run(BF16, pl, 128, 3, bh, hd, mask, n);
        snprintf(line, sizeof line, "edge bf16 max/Inf %-5s: rows %d and %d NaN weights %s", kind, sat, over, nan_row(o, mask, over, M) && nan_row(o, mask, sat, M) ? "yes" : "NO");
        verdict(nan_row(o, mask, over, M) && nan_row(o, mask, sat, M), line);
    }
}

int main(int argc, char** argv) {
    const unsigned seed = argc > 1 ? (unsigned)std::strtoul(argv[1], nullptr, 10) : 7u;
    printf("seed %u\n", seed);
    verdict(conversions_ok(), "half conversions (every f16, rounding)");
    std::mt19937 rng(7);
    variants(rng);
    whole_head(seed);
    edges(seed);
    printf("%d failed\n", fails);
    return fails != 0;
}
