// observer.wgsl: MinMaxObserver / PerChannelMinMaxObserver on the GPU: a two-level min/max
// requires: lib/float_bits.wgsl
// requires: lib/exact_float.wgsl (nmin, nmax, div_rn)
// reduction per tensor or per channel (any axis), then PyTorch's _calculate_qparams
// (widen to include 0, symmetric or affine, eps clamp, zero point clamped to the range),
// also writing inv = 1/scale for fake_quant.wgsl. Bit-exact with src/reference/observer.rs:
// every division is div_rn, a correctly rounded f32 division in integer arithmetic (WGSL `/`
// is only accurate to 2.5 ulp). NaN anywhere in a channel gives min = max = NaN and a NaN
// scale (and inv), and zero point clamp(0, qmin, qmax) for affine schemes; min/max never rely
// on WGSL min/max NaN behaviour (bit-pattern test). A channel with no elements (min = +inf,
// max = -inf) gives scale 1.0, zero point 0, as PyTorch's check_min_max_valid.
//
// Bindings (group 0):
//   @group(0) @binding(0) params:   uniform Params  m (elements per channel = outer*inner),
//                                   inner (product of the dims after the axis; 1 per tensor),
//                                   channels (C; 1 per tensor), groups (G, partial workgroups
//                                   per channel), quant_min, quant_max, zp_symmetric,
//                                   symmetric (0/1), eps, denom (qmax-qmin, or (qmax-qmin)/2
//                                   when symmetric, as the CPU computes it), n (div_rn_test)
//   @group(0) @binding(1) x:        storage, read array<f32>  observed tensor (div_rn_test: numerators)
//   @group(0) @binding(2) partials: storage, read_write array<f32>  2*C*G: (min, max) of
//                                   partial g of channel c at 2*(c*G + g)
//   @group(0) @binding(3) minmax:   storage, read_write array<f32>  2*C: min[C] then max[C]
//   @group(0) @binding(4) qp:       storage, read_write array<u32>  3*C: scale[C] (f32 bits),
//                                   inv[C] (f32 bits), zero_point[C] (i32 bits)
//   @group(0) @binding(5) b:        storage, read array<f32>  div_rn_test: denominators
//   @group(0) @binding(6) quot:     storage, read_write array<f32>  div_rn_test: div_rn(x, b)
//
// Entry points and dispatch (workgroup size WGR = 256, fixed: it sizes workgroup memory):
//   minmax_partial (0,1,2): grid (G, Cy, Cz), channel c = wid.y + wid.z * num_workgroups.y;
//                  workgroup (g, c) folds elements g*WGR + lid, stepping G*WGR, then reduces
//                  in workgroup memory and writes partial g of channel c.
//   minmax_final   (0,2,3): grid (1, Cy, Cz); one workgroup per channel reduces its G partials.
//   minmax_small   (0,1,3): for few elements per channel (m <= 256), instead of the two
//                  passes above: one thread per channel, 1-D grid over C (flat index
//                  gid.x + gid.y * num_workgroups.x * WGR).
//   calc_qparams   (0,3,4): 1-D grid over C (flat index gid.x + gid.y * num_workgroups.x * WGR).
//   div_rn_test    (0,1,5,6): 1-D grid over n, same tiling; exposes div_rn for testing.

const WGR: u32 = 256u;

struct Params {
    m: u32,
    inner: u32,
    channels: u32,
    groups: u32,
    quant_min: i32,
    quant_max: i32,
    zp_symmetric: i32,
    symmetric: u32,
    eps: f32,
    denom: f32,
    n: u32,
    _pad: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
@group(0) @binding(3) var<storage, read_write> minmax: array<f32>;
@group(0) @binding(4) var<storage, read_write> qp: array<u32>;
@group(0) @binding(5) var<storage, read> b: array<f32>;
@group(0) @binding(6) var<storage, read_write> quot: array<f32>;

var<workgroup> smin: array<f32, WGR>;
var<workgroup> smax: array<f32, WGR>;

// Round-to-nearest-even float to i32 with Rust `as i32` semantics (NaN -> 0, saturating).
fn to_i32_sat(v: f32) -> i32 {
    if (is_nan(v)) {
        return 0;
    }
    if (v >= 2147483648.0) {
        return 2147483647;
    }
    if (v < -2147483648.0) {
        return -2147483647 - 1;
    }
    return i32(v);
}

// clamp(qmin - r, qmin, qmax) as if in 64-bit integers (no i32 overflow).
fn zero_point(r: i32) -> i32 {
    let qmin = params.quant_min;
    let qmax = params.quant_max;
    if (r > 0) {
        return qmin;
    }
    // -r and qmax - qmin as u32 are exact (wrapping arithmetic, qmax > qmin).
    let neg_r = bitcast<u32>(0 - r);
    let span = bitcast<u32>(qmax - qmin);
    if (neg_r > span) {
        return qmax;
    }
    return qmin + bitcast<i32>(neg_r);
}

fn element_index(c: u32, j: u32) -> u32 {
    if (params.channels == 1u) {
        return j;
    }
    let inner = params.inner;
    return (j / inner) * (params.channels * inner) + c * inner + (j % inner);
}

// Tree reduction of smin/smax over the workgroup; the result lands in slot 0.
fn reduce_workgroup(lid: u32) {
    workgroupBarrier();
    for (var s = WGR / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            smin[lid] = nmin(smin[lid], smin[lid + s]);
            smax[lid] = nmax(smax[lid], smax[lid + s]);
        }
        workgroupBarrier();
    }
}

@compute @workgroup_size(WGR)
fn minmax_partial(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = wid.x;
    let c = wid.y + wid.z * nwg.y;
    var lo = from_bits(0x7f800000u);
    var hi = from_bits(0xff800000u);
    if (c < params.channels) {
        let stride = params.groups * WGR;
        for (var j = g * WGR + lid.x; j < params.m; j = j + stride) {
            let v = x[element_index(c, j)];
            lo = nmin(lo, v);
            hi = nmax(hi, v);
        }
    }
    smin[lid.x] = lo;
    smax[lid.x] = hi;
    reduce_workgroup(lid.x);
    if (lid.x == 0u && c < params.channels) {
        let k = 2u * (c * params.groups + g);
        partials[k] = smin[0];
        partials[k + 1u] = smax[0];
    }
}

@compute @workgroup_size(WGR)
fn minmax_final(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = wid.y + wid.z * nwg.y;
    var lo = from_bits(0x7f800000u);
    var hi = from_bits(0xff800000u);
    if (c < params.channels) {
        for (var g = lid.x; g < params.groups; g = g + WGR) {
            let k = 2u * (c * params.groups + g);
            lo = nmin(lo, partials[k]);
            hi = nmax(hi, partials[k + 1u]);
        }
    }
    smin[lid.x] = lo;
    smax[lid.x] = hi;
    reduce_workgroup(lid.x);
    if (lid.x == 0u && c < params.channels) {
        minmax[c] = smin[0];
        minmax[params.channels + c] = smax[0];
    }
}

@compute @workgroup_size(WGR)
fn minmax_small(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * (nwg.x * WGR);
    if (c >= params.channels) {
        return;
    }
    var lo = from_bits(0x7f800000u);
    var hi = from_bits(0xff800000u);
    for (var j = 0u; j < params.m; j = j + 1u) {
        let v = x[element_index(c, j)];
        lo = nmin(lo, v);
        hi = nmax(hi, v);
    }
    minmax[c] = lo;
    minmax[params.channels + c] = hi;
}

@compute @workgroup_size(WGR)
fn calc_qparams(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = gid.x + gid.y * (nwg.x * WGR);
    let nc = params.channels;
    if (c >= nc) {
        return;
    }
    let lo = minmax[c];
    let hi = minmax[nc + c];
    var scale: f32;
    var zp: i32;
    if (bitcast<u32>(lo) == 0x7f800000u && bitcast<u32>(hi) == 0xff800000u) {
        // Never observed (no elements): PyTorch's check_min_max_valid gives (1.0, 0).
        scale = 1.0;
        zp = 0;
    } else if (params.symmetric != 0u) {
        let min_neg = nmin(lo, 0.0);
        let max_pos = nmax(hi, 0.0);
        let amax = nmax(-min_neg, max_pos);
        scale = nmax(div_rn(amax, params.denom), params.eps);
        zp = params.zp_symmetric;
    } else {
        let min_neg = nmin(lo, 0.0);
        let max_pos = nmax(hi, 0.0);
        scale = nmax(div_rn(max_pos - min_neg, params.denom), params.eps);
        if (is_nan(scale)) {
            zp = clamp(0, params.quant_min, params.quant_max);
        } else {
            zp = zero_point(to_i32_sat(round(div_rn(min_neg, scale))));
        }
    }
    qp[c] = bitcast<u32>(scale);
    qp[nc + c] = bitcast<u32>(div_rn(1.0, scale));
    qp[2u * nc + c] = bitcast<u32>(zp);
}

@compute @workgroup_size(WGR)
fn div_rn_test(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WGR);
    if (i >= params.n) {
        return;
    }
    quot[i] = div_rn(x[i], b[i]);
}
