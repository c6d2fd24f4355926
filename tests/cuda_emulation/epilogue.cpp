// Host emulation of kernels/fusion_epilogue.cu, for checking the kernels' logic without a GPU
// (tests/cuda_emulation.rs compiles and runs it with g++ -std=c++20).
//
// The .cu file is compiled as plain C++: the CUDA qualifiers become no-ops, every CUDA thread of
// a block is an OS thread, __syncthreads is a block-wide std::barrier, and __syncwarp and
// __shfl_xor_sync are a per-warp barrier (the shuffle exchanges through a per-warp array between
// two barriers). Blocks run one after another; dynamic shared memory is one array the block's
// threads share. Every epilogue (block-per-row with each shared-memory flag combination, and
// the warp-per-row variants) runs on random projections against a double-precision reference,
// including a NaN in a present projection (the row's weights must come out NaN, absent ones 0)
// and an Inf in an absent one (never read). This checks indexing, reductions, the online
// softmax and the non-finite rule; it cannot check GPU-only matters (launch limits, timing,
// CUDA's own tanhf/expf), which tests/cuda_backend.rs covers on a real GPU.
#include <barrier>
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
static inline float __shfl_xor_sync(unsigned, float v, int o) {
    my_warp->slot[my_lane] = v; my_warp->bar->arrive_and_wait();
    float r = my_warp->slot[my_lane ^ o]; my_warp->bar->arrive_and_wait(); return r;
}
static inline void __syncwarp() { my_warp->bar->arrive_and_wait(); }
static inline void __syncthreads() { block_bar->arrive_and_wait(); }

#include "fusion_epilogue.cu"

using K = void (*)(const float*, const float*, const float*, const float*, const float*,
                   const unsigned char*, float*, float*, int, int, int, float, int);

void launch(K k, unsigned grid, unsigned block, const float* h, const float* b, const float* g,
            const float* ga, const float* be, const unsigned char* mask, float* y, float* w,
            int n, int D, int M, float eps, int flags) {
    blockDim.x = block;
    for (unsigned bi = 0; bi < grid; ++bi) {
        std::barrier<> bbar(block);
        block_bar = &bbar;
        std::vector<std::unique_ptr<std::barrier<>>> wb;
        std::vector<Warp> warps(block / 32);
        for (unsigned wi = 0; wi < block / 32; ++wi) { wb.emplace_back(new std::barrier<>(32)); warps[wi].bar = wb.back().get(); }
        std::vector<std::thread> ts;
        for (unsigned t = 0; t < block; ++t) {
            ts.emplace_back([&, t] {
                threadIdx.x = t; blockIdx.x = bi; my_warp = &warps[t / 32]; my_lane = t % 32;
                k(h, b, g, ga, be, mask, y, w, n, D, M, eps, flags);
                // A thread that returned early leaves the barriers (only whole warps/blocks do).
            });
        }
        for (auto& t : ts) t.join();
    }
}

int main() {
    std::mt19937 rng(7);
    std::normal_distribution<float> nd(0.f, 1.f);
    int fails = 0;
    const std::pair<int, int> shapes[] = {{512, 3}, {512, 1}, {200, 3}, {256, 5}, {257, 3},
                                           {33, 5},  {8, 1},   {1024, 3}, {100, 2}, {64, 40}};
    for (auto [D, M] : shapes) {
        {
            int n = 19;
            float eps = 1e-5f;
            std::vector<float> h((size_t)M * n * D), b((size_t)M * D), g(D), ga(D), be(D);
            for (auto& x : h) x = nd(rng) * 2;
            for (auto& x : b) x = nd(rng) * 0.1f;
            for (auto& x : g) x = nd(rng) * 0.3f;
            for (auto& x : ga) x = 1 + nd(rng) * 0.1f;
            for (auto& x : be) x = nd(rng) * 0.1f;
            std::vector<unsigned char> mask((size_t)n * M);
            for (int r = 0; r < n; ++r) { bool any = false; for (int m = 0; m < M; ++m) { mask[r*M+m] = rng() % 3 != 0; any |= mask[r*M+m]; } if (!any) mask[r*M + r % M] = 1; }
            // NaN in a present projection (row 5) and in an absent one (row 9).
            int bad_row = 5, absent_row = 9;
            { int m = 0; while (!mask[bad_row*M+m]) ++m; h[((size_t)m*n+bad_row)*D + D/2] = NAN; }
            if (M > 1) { mask[absent_row*M+0] = 0; mask[absent_row*M+1] = 1; h[((size_t)0*n+absent_row)*D] = INFINITY; }
            // Reference.
            std::vector<double> ry((size_t)n*D), rw((size_t)n*M);
            for (int r = 0; r < n; ++r) {
                std::vector<double> s(M), a(M, 0.0); double mx = -INFINITY;
                for (int m = 0; m < M; ++m) if (mask[r*M+m]) { double acc = 0; for (int d = 0; d < D; ++d) acc += g[d]*std::tanh((double)h[((size_t)m*n+r)*D+d] + b[m*D+d]); s[m] = acc; mx = std::max(mx, acc); }
                double sum = 0; for (int m = 0; m < M; ++m) if (mask[r*M+m]) sum += std::exp(s[m]-mx);
                for (int m = 0; m < M; ++m) if (mask[r*M+m]) a[m] = std::exp(s[m]-mx)/sum;
                std::vector<double> z(D, 0.0); for (int m = 0; m < M; ++m) if (a[m] != 0) for (int d = 0; d < D; ++d) z[d] += a[m]*((double)h[((size_t)m*n+r)*D+d] + b[m*D+d]);
                double mean = 0; for (double v : z) mean += v; mean /= D; double var = 0; for (double v : z) var += (v-mean)*(v-mean); var /= D;
                for (int d = 0; d < D; ++d) ry[(size_t)r*D+d] = (z[d]-mean)/std::sqrt(var+eps)*ga[d]+be[d];
                for (int m = 0; m < M; ++m) rw[r*M+m] = a[m];
            }
            struct V { const char* name; K k; unsigned rows_per_block, block; int flags; };
            std::vector<V> vs = {
                {"block(z,h shared)", fusion_epilogue_f32, 1, 128, 3},
                {"block(z shared)", fusion_epilogue_f32, 1, 96, 1},
                {"block(no shared)", fusion_epilogue_f32, 1, 64, 0},
            };
            int pl = D <= 128 ? 4 : D <= 256 ? 8 : D <= 512 ? 16 : 32;
            K wk = pl == 4 ? fusion_epilogue_warp4_f32 : pl == 8 ? fusion_epilogue_warp8_f32 : pl == 16 ? fusion_epilogue_warp16_f32 : fusion_epilogue_warp32_f32;
            vs.push_back({"warp", wk, 8, 256, 0});
            for (auto& v : vs) {
                std::vector<float> y((size_t)n*D, -7.f), w((size_t)n*M, -7.f);
                launch(v.k, (n + v.rows_per_block - 1) / v.rows_per_block, v.block, h.data(), b.data(), g.data(), ga.data(), be.data(), mask.data(), y.data(), w.data(), n, D, M, eps, v.flags);
                double ey = 0, ew = 0; bool nan_ok = true;
                for (int r = 0; r < n; ++r) {
                    bool bad = r == bad_row;
                    for (int m = 0; m < M; ++m) {
                        float x = w[r*M+m];
                        if (bad) { if (mask[r*M+m] && !std::isnan(x)) nan_ok = false; if (!mask[r*M+m] && x != 0.f) nan_ok = false; }
                        else ew = std::max(ew, std::fabs(x - rw[r*M+m]));
                    }
                    if (!bad) for (int d = 0; d < D; ++d) { float x = y[(size_t)r*D+d]; ey = std::max(ey, std::isfinite(x) ? std::fabs(x - ry[(size_t)r*D+d]) : 1e9); }
                }
                bool ok = ey < 1e-4 && ew < 1e-5 && nan_ok;
                fails += !ok;
                printf("D=%4d M=%d %-18s fused err %.2e weights err %.2e nan-row %s %s\n", D, M, v.name, ey, ew, nan_ok ? "ok" : "WRONG", ok ? "ok" : "FAIL");
            }
        }
    }
    printf("%d failed\n", fails);
    return fails != 0;
}
