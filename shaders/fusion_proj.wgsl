// fusion_proj: the projection GEMMs of every modality in one dispatch, h_m = x_m W_m^T + b_m,
// with the attention score's partial sums fused into the GEMM's epilogue.
//
// Grid: x = column tile (BN columns of D), y = row tile (BM samples), z = modality.
// Each workgroup stages a [BM, BK] tile of x and a [BK, BN] tile of W^T in workgroup memory
// per step of K, both read from storage as vec4, and accumulates a TM x TN register block per
// invocation in f32. When the tile is done it adds the bias, writes h (once), and reduces
// q . tanh(h) over its BN columns into one partial score per (modality, row, column tile), so
// the epilogue never re-reads h to score it.
//
// No bounds checks in the K loop: the host pads every operand so that each tile is in range.
// x_m is [rows_pad, ks] (rows_pad a multiple of 128, ks = d_m rounded up to 16, padding zero)
// and W_m^T is [ks, DP] (DP = D rounded up to 128, padding zero). Only the stores of h and of
// the partial scores are guarded, once per output after the K loop.
//
// The host prepends a prelude defining BM, BN, BK, TM, TN, SH (workgroup floats), the input
// element type `xin_t` and the weight element type `win_t` (f32, or f16 behind `enable f16;` on
// adapters with SHADER_F16; the accumulation is f32 either way).

const WGX: u32 = BN / TN;
const WGY: u32 = BM / TM;
const NT: u32 = WGX * WGY;
// Row stride of the staged x tile: one float of padding so that the transposing store
// (consecutive invocations write consecutive k) does not hit one memory bank.
const XS: u32 = BM + 1u;
const WOFF: u32 = BK * XS;
const BK4: u32 = BK / 4u;
const BN4: u32 = BN / 4u;

struct Params {
    rows: u32,
    dim: u32,
    nmod: u32,
    ntn: u32,
    eps: f32,
    gx: u32,
    // Row stride of W^T (D rounded up to 128).
    dp: u32,
    pad1: u32,
}

// k: padded width ks; x_off, w_off: element offsets (multiples of 16).
struct ModInfo {
    k: u32,
    x_off: u32,
    w_off: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> mods: array<ModInfo>;
@group(0) @binding(2) var<storage, read> x: array<vec4<xin_t>>;
// W_m^T, [ks, DP] row-major per modality, at mods[m].w_off.
@group(0) @binding(3) var<storage, read> wt: array<vec4<win_t>>;
// bias [M, D], then gate q [D], gamma [D], beta [D].
@group(0) @binding(4) var<storage, read> vecs: array<f32>;
// h [M, rows, D] (bias included).
@group(0) @binding(5) var<storage, read_write> h: array<f32>;
// Partial scores [M, rows, ntn].
@group(0) @binding(6) var<storage, read_write> part: array<f32>;

var<workgroup> sh: array<f32, SH>;
var<workgroup> kdim: u32;

// tanh as a [13/6] rational function on a clamped argument (the approximation Eigen uses for
// float): a few ulp everywhere, no exp overflow, identical on every driver.
fn tanh_r(x0: f32) -> f32 {
    let x = clamp(x0, -7.90531110763549805, 7.90531110763549805);
    let x2 = x * x;
    var num = -2.76076847742355e-16;
    num = fma(x2, num, 2.00018790482477e-13);
    num = fma(x2, num, -8.60467152213735e-11);
    num = fma(x2, num, 5.12229709037114e-08);
    num = fma(x2, num, 1.48572235717979e-05);
    num = fma(x2, num, 6.37261928875436e-04);
    num = fma(x2, num, 4.89352455891786e-03);
    num = x * num;
    var den = 1.19825839466702e-06;
    den = fma(x2, den, 1.18534705686654e-04);
    den = fma(x2, den, 2.26843463243900e-03);
    den = fma(x2, den, 4.89352518554385e-03);
    return num / den;
}

@compute @workgroup_size(WGX, WGY, 1)
fn fusion_proj(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_id) lid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let mi = wid.z;
    let info = mods[mi];
    if tid == 0u {
        kdim = info.k;
    }
    // The K loop holds barriers: its bound must be provably uniform across the workgroup.
    let k_len = workgroupUniformLoad(&kdim);
    let rows = p.rows;
    let dim = p.dim;
    let dp = p.dp;
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;
    // vec4 indices of this tile's first x row and first W^T column.
    let x_base = (info.x_off + row0 * k_len) / 4u;
    let w_base = (info.w_off + col0) / 4u;
    let k4 = k_len / 4u;
    let dp4 = dp / 4u;

    var acc: array<f32, TM * TN>;
    for (var k0 = 0u; k0 < k_len; k0 += BK) {
        for (var i = 0u; i < BM * BK4 / NT; i++) {
            let e = tid + i * NT;
            let r = e / BK4;
            let kq = e % BK4;
            let v = vec4<f32>(x[x_base + r * k4 + k0 / 4u + kq]);
            let s = kq * 4u * XS + r;
            sh[s] = v.x;
            sh[s + XS] = v.y;
            sh[s + 2u * XS] = v.z;
            sh[s + 3u * XS] = v.w;
        }
        for (var i = 0u; i < BN4 * BK / NT; i++) {
            let e = tid + i * NT;
            let kk = e / BN4;
            let cq = e % BN4;
            let v = vec4<f32>(wt[w_base + (k0 + kk) * dp4 + cq]);
            let s = WOFF + kk * BN + cq * 4u;
            sh[s] = v.x;
            sh[s + 1u] = v.y;
            sh[s + 2u] = v.z;
            sh[s + 3u] = v.w;
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk++) {
            var a: array<f32, TM>;
            var b: array<f32, TN>;
            for (var i = 0u; i < TM; i++) {
                a[i] = sh[kk * XS + lid.y + i * WGY];
            }
            for (var j = 0u; j < TN; j++) {
                b[j] = sh[WOFF + kk * BN + lid.x + j * WGX];
            }
            for (var i = 0u; i < TM; i++) {
                for (var j = 0u; j < TN; j++) {
                    acc[i * TN + j] = fma(a[i], b[j], acc[i * TN + j]);
                }
            }
        }
        workgroupBarrier();
    }
    // Bias, store h, and this invocation's share of q . tanh(h) per row.
    let gate = p.nmod * dim;
    for (var i = 0u; i < TM; i++) {
        let lr = lid.y + i * WGY;
        let gr = row0 + lr;
        var ps = 0.0;
        if gr < rows {
            for (var j = 0u; j < TN; j++) {
                let gc = col0 + lid.x + j * WGX;
                if gc < dim {
                    let v = acc[i * TN + j] + vecs[mi * dim + gc];
                    h[(mi * rows + gr) * dim + gc] = v;
                    ps = fma(vecs[gate + gc], tanh_r(v), ps);
                }
            }
        }
        sh[lr * WGX + lid.x] = ps;
    }
    workgroupBarrier();
    if tid < BM {
        let gr = row0 + tid;
        if gr < rows {
            var s = 0.0;
            for (var t = 0u; t < WGX; t++) {
                s += sh[tid * WGX + t];
            }
            part[(mi * rows + gr) * p.ntn + wid.x] = s;
        }
    }
}
