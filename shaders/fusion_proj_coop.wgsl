// fusion_proj_coop: the projection GEMMs on cooperative matrices (`wgpu_cooperative_matrix`,
// VK_KHR_cooperative_matrix on Vulkan), f16 operands with f32 accumulation, same bindings,
// padding and outputs as fusion_proj.wgsl (which it replaces where the adapter reports f16
// 16 x 16 x 16 matrices with an f32 accumulator).
//
// One workgroup is one subgroup (SG invocations) and computes a [BM, BN] = [16 FM, 16 FN] tile
// as FM x FN accumulators, loading its A (x, row-major [rows_pad, ks]) and B (W^T, row-major
// [ks, DP]) fragments straight from storage; the host's padding keeps every fragment in range.
// The accumulators go through workgroup memory for the fused bias, h store and partial score.
//
// The host prepends `enable f16; enable wgpu_cooperative_matrix;` and FM, FN, SG.

const BM: u32 = 16u * FM;
const BN: u32 = 16u * FN;

struct Params {
    rows: u32,
    dim: u32,
    nmod: u32,
    ntn: u32,
    eps: f32,
    gx: u32,
    dp: u32,
    pad1: u32,
}

struct ModInfo {
    k: u32,
    x_off: u32,
    w_off: u32,
    pad: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
@group(0) @binding(1) var<storage, read> mods: array<ModInfo>;
@group(0) @binding(2) var<storage, read> x: array<f16>;
@group(0) @binding(3) var<storage, read> wt: array<f16>;
@group(0) @binding(4) var<storage, read> vecs: array<f32>;
@group(0) @binding(5) var<storage, read_write> h: array<f32>;
@group(0) @binding(6) var<storage, read_write> part: array<f32>;

var<workgroup> cs: array<f32, BM * BN>;

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

@compute @workgroup_size(SG, 1, 1)
fn fusion_proj(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    let mi = wid.z;
    let info = mods[mi];
    let k_len = info.k;
    let rows = p.rows;
    let dim = p.dim;
    let dp = p.dp;
    let row0 = wid.y * BM;
    let col0 = wid.x * BN;

    var acc: array<coop_mat16x16<f32, C>, FM * FN>;
    for (var t = 0u; t < FM * FN; t++) {
        acc[t] = coop_mat16x16<f32, C>();
    }
    for (var k0 = 0u; k0 < k_len; k0 += 16u) {
        var a: array<coop_mat16x16<f16, A>, FM>;
        var b: array<coop_mat16x16<f16, B>, FN>;
        for (var i = 0u; i < FM; i++) {
            let at = info.x_off + (row0 + i * 16u) * k_len + k0;
            a[i] = coopLoadT<coop_mat16x16<f16, A>>(&x[at], k_len);
        }
        for (var j = 0u; j < FN; j++) {
            let at = info.w_off + k0 * dp + col0 + j * 16u;
            b[j] = coopLoadT<coop_mat16x16<f16, B>>(&wt[at], dp);
        }
        for (var i = 0u; i < FM; i++) {
            for (var j = 0u; j < FN; j++) {
                acc[i * FN + j] = coopMultiplyAdd(a[i], b[j], acc[i * FN + j]);
            }
        }
    }
    for (var i = 0u; i < FM; i++) {
        for (var j = 0u; j < FN; j++) {
            coopStoreT(acc[i * FN + j], &cs[i * 16u * BN + j * 16u], BN);
        }
    }
    workgroupBarrier();

    // Bias, store h, and q . tanh(h) over this tile's columns, one row per invocation.
    let gate = p.nmod * dim;
    for (var lr = tid; lr < BM; lr += SG) {
        let gr = row0 + lr;
        if gr < rows {
            var ps = 0.0;
            for (var c = 0u; c < BN; c++) {
                let gc = col0 + c;
                if gc < dim {
                    let v = cs[lr * BN + c] + vecs[mi * dim + gc];
                    h[(mi * rows + gr) * dim + gc] = v;
                    ps = fma(vecs[gate + gc], tanh_r(v), ps);
                }
            }
            part[(mi * rows + gr) * p.ntn + wid.x] = ps;
        }
    }
}
