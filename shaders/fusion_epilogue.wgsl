// fusion_epilogue: per sample, sums the partial attention scores written by fusion_proj, takes
// the masked softmax over modalities, forms z = sum_m a_m h_m reading each present h_m once, and
// applies LayerNorm. One workgroup of EW invocations per sample; each invocation keeps VPT
// elements of z in registers (columns tid, tid + EW, ...).
//
// Absent modalities are never read (their rows may hold anything, NaN included) and get a
// weight of exactly 0.
//
// The host prepends a prelude defining VPT (= ceil(D / EW)).

const EW: u32 = 256u;

struct Params {
    rows: u32,
    dim: u32,
    nmod: u32,
    ntn: u32,
    eps: f32,
    gx: u32,
    pad0: u32,
    pad1: u32,
}

@group(0) @binding(0) var<uniform> p: Params;
// [rows, M] u8 mask, packed four to a word.
@group(0) @binding(1) var<storage, read> mask: array<u32>;
@group(0) @binding(2) var<storage, read> h: array<f32>;
@group(0) @binding(3) var<storage, read> part: array<f32>;
// bias [M, D], then gate q [D], gamma [D], beta [D].
@group(0) @binding(4) var<storage, read> vecs: array<f32>;
// fused [rows, D], then weights [rows, M].
@group(0) @binding(5) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, EW>;

fn present(r: u32, m: u32) -> bool {
    let i = r * p.nmod + m;
    return ((mask[i >> 2u] >> ((i & 3u) * 8u)) & 0xffu) != 0u;
}

fn score(r: u32, m: u32) -> f32 {
    let base = (m * p.rows + r) * p.ntn;
    var s = 0.0;
    for (var j = 0u; j < p.ntn; j++) {
        s += part[base + j];
    }
    return s;
}

fn block_sum(v: f32, tid: u32) -> f32 {
    red[tid] = v;
    workgroupBarrier();
    for (var s = EW / 2u; s > 0u; s >>= 1u) {
        if tid < s {
            red[tid] += red[tid + s];
        }
        workgroupBarrier();
    }
    let total = red[0];
    workgroupBarrier();
    return total;
}

@compute @workgroup_size(EW, 1, 1)
fn fusion_epilogue(
    @builtin(workgroup_id) wid: vec3<u32>,
    @builtin(local_invocation_index) tid: u32,
) {
    // The host dispatches exactly one workgroup per row of the chunk.
    let r = wid.x + wid.y * p.gx;
    let rows = p.rows;
    let dim = p.dim;
    let nmod = p.nmod;

    // Masked softmax statistics (a handful of modalities: every invocation computes them).
    var smax = -3.0e38;
    for (var m = 0u; m < nmod; m++) {
        if present(r, m) {
            smax = max(smax, score(r, m));
        }
    }
    var ssum = 0.0;
    for (var m = 0u; m < nmod; m++) {
        if present(r, m) {
            ssum += exp(score(r, m) - smax);
        }
    }
    let inv = 1.0 / ssum;

    var z: array<f32, VPT>;
    for (var m = 0u; m < nmod; m++) {
        if present(r, m) {
            let a = exp(score(r, m) - smax) * inv;
            let base = (m * rows + r) * dim;
            for (var v = 0u; v < VPT; v++) {
                let d = tid + v * EW;
                if d < dim {
                    z[v] = fma(a, h[base + d], z[v]);
                }
            }
        }
    }
    for (var m = tid; m < nmod; m += EW) {
        var a = 0.0;
        if present(r, m) {
            a = exp(score(r, m) - smax) * inv;
        }
        out[rows * dim + r * nmod + m] = a;
    }

    // LayerNorm (biased variance, two passes over the registers).
    var ls = 0.0;
    for (var v = 0u; v < VPT; v++) {
        if tid + v * EW < dim {
            ls += z[v];
        }
    }
    let mean = block_sum(ls, tid) / f32(dim);
    var lq = 0.0;
    for (var v = 0u; v < VPT; v++) {
        if tid + v * EW < dim {
            let t = z[v] - mean;
            lq = fma(t, t, lq);
        }
    }
    let variance = block_sum(lq, tid) / f32(dim);
    let rstd = 1.0 / sqrt(variance + p.eps);
    let gamma = (nmod + 1u) * dim;
    let beta = (nmod + 2u) * dim;
    for (var v = 0u; v < VPT; v++) {
        let d = tid + v * EW;
        if d < dim {
            out[r * dim + d] = (z[v] - mean) * rstd * vecs[gamma + d] + vecs[beta + d];
        }
    }
}
