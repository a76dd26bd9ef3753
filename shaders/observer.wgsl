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
//   @group(0) @binding(0) params:   uniform Params  reduction layout in "units" (a unit is a
//                                   vec4 when vec4 = 1, else one f32): m (units per channel),
//                                   inner (units per contiguous run of a channel: the product of
//                                   the dims after the axis, /4 for vec4; m per tensor),
//                                   channels (C; 1 per tensor), groups (G, partial workgroups
//                                   per channel), chunk (units per partial workgroup), row_stride
//                                   (C*inner, units between a channel's runs), step_rows
//                                   ((WGR / inner) * row_stride, wrapping), step_units (WGR %
//                                   inner), vec4 (0/1), tail (first f32 element of the
//                                   per-tensor tail that is not a whole vec4; n when none);
//                                   qparams: quant_min, quant_max, zp_symmetric, symmetric (0/1),
//                                   eps, denom (qmax-qmin, or (qmax-qmin)/2 when symmetric, as
//                                   the CPU computes it); n (elements of x; div_rn_test: count)
//   @group(0) @binding(1) x:        storage, read array<f32>  observed tensor (div_rn_test: numerators)
//   @group(0) @binding(2) partials: storage, read_write array<f32>  2*C*G: (min, max) of
//                                   partial g of channel c at 2*(c*G + g)
//   @group(0) @binding(3) minmax:   storage, read_write array<f32>  2*C: min[C] then max[C]
//   @group(0) @binding(4) qp:       storage, read_write array<u32>  3*C: scale[C] (f32 bits),
//                                   inv[C] (f32 bits), zero_point[C] (i32 bits)
//   @group(0) @binding(5) b:        storage, read array<f32>  div_rn_test: denominators
//   @group(0) @binding(6) quot:     storage, read_write array<f32>  div_rn_test: div_rn(x, b)
//   @group(0) @binding(7) x4:       storage, read array<vec4<f32>>  x as vec4s (minmax_partial;
//                                   the same buffer as x, at least 16 bytes)
//
// Entry points and dispatch (workgroup size WGR = 64, fixed: it sizes workgroup memory):
//   minmax_partial (0,1,2,7): grid (G, Cy, Cz), channel c = wid.y + wid.z * num_workgroups.y;
//                  workgroup (g, c) folds the units [g*chunk, min((g+1)*chunk, m)) of channel
//                  c (unit k of the channel: run k / inner, unit k % inner of the run, at
//                  (k / inner) * row_stride + c * inner + k % inner), invocation lid taking
//                  units g*chunk + lid + WGR*t, in registers (vec4 min/max by select, NaN as
//                  a separate flag), then one barrier and invocation 0 folds the WGR results
//                  and writes partial g of channel c. Workgroup 0 of a per-tensor vec4
//                  reduction also folds the tail elements [tail, n) (fewer than 4).
//   minmax_final   (0,2,3): grid (1, Cy, Cz); one workgroup per channel reduces its G partials.
//   minmax_small   (0,1,3): for few elements per channel (m <= 256), instead of the two
//                  passes above: one thread per channel, 1-D grid over C (flat index
//                  gid.x + gid.y * num_workgroups.x * WGR); m, inner in f32 elements.
//   calc_qparams   (0,3,4): 1-D grid over C (flat index gid.x + gid.y * num_workgroups.x * WGR).
//   div_rn_test    (0,1,5,6): 1-D grid over n, same tiling; exposes div_rn for testing.

const WGR: u32 = 64u;
// Lanes per stream of minmax_partial (consecutive units side by side), streams per workgroup.
const LANES: u32 = 8u;
const STREAMS: u32 = WGR / LANES;

struct Params {
    m: u32,
    inner: u32,
    channels: u32,
    groups: u32,
    chunk: u32,
    row_stride: u32,
    step_rows: u32,
    step_units: u32,
    vec4: u32,
    tail: u32,
    n: u32,
    quant_min: i32,
    quant_max: i32,
    zp_symmetric: i32,
    symmetric: u32,
    eps: f32,
    denom: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
@group(0) @binding(3) var<storage, read_write> minmax: array<f32>;
@group(0) @binding(4) var<storage, read_write> qp: array<u32>;
@group(0) @binding(5) var<storage, read> b: array<f32>;
@group(0) @binding(6) var<storage, read_write> quot: array<f32>;
@group(0) @binding(7) var<storage, read> x4: array<vec4<f32>>;

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

fn is_nan4(v: vec4<f32>) -> vec4<bool> {
    return (bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu)) > vec4<u32>(0x7f800000u);
}

// Advances a unit position of minmax_partial by LANES units of the channel: whole runs, then
// the remainder (at most one more run). *i is the unit within its run; returns the address.
fn advance(i: ptr<function, u32>, addr: u32) -> u32 {
    var a = addr + params.step_rows + params.step_units;
    var j = *i + params.step_units;
    if (j >= params.inner) {
        j = j - params.inner;
        a = a + (params.row_stride - params.inner);
    }
    *i = j;
    return a;
}

// Stores this invocation's (min, max) in workgroup memory; after one barrier, invocation 0
// returns the workgroup's (min, max) folded with nmin/nmax (NaN-propagating). Every
// invocation must call it (uniform control flow); only invocation 0's result is meaningful.
fn reduce_workgroup(lid: u32, lo: f32, hi: f32) -> vec2<f32> {
    smin[lid] = lo;
    smax[lid] = hi;
    workgroupBarrier();
    var rlo = lo;
    var rhi = hi;
    if (lid == 0u) {
        for (var k = 1u; k < WGR; k = k + 1u) {
            rlo = nmin(rlo, smin[k]);
            rhi = nmax(rhi, smax[k]);
        }
    }
    return vec2<f32>(rlo, rhi);
}

@compute @workgroup_size(WGR)
fn minmax_partial(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = wid.x;
    let c = wid.y + wid.z * nwg.y;
    let inf = from_bits(0x7f800000u);
    var lo4 = vec4<f32>(inf);
    var hi4 = vec4<f32>(-inf);
    var nan4 = vec4<bool>(false);
    if (c < params.channels) {
        let inner = params.inner;
        // Stream q = lid / LANES of this workgroup: units [s*chunk, min((s+1)*chunk, m)) of
        // the channel, s = g*STREAMS + q; lane r = lid % LANES takes every LANES-th unit.
        let s = g * STREAMS + lid.x / LANES;
        let start = s * params.chunk + lid.x % LANES;
        let end = min(s * params.chunk + params.chunk, params.m);
        // Unit start of the channel: run start / inner, unit i of the run, at addr.
        var i = start % inner;
        var addr = (start / inner) * params.row_stride + c * inner + i;
        let vec4_loads = params.vec4 != 0u;
        var u = start;
        if (vec4_loads) {
            // Four loads in flight per iteration.
            for (; u + 3u * LANES < end; u = u + 4u * LANES) {
                let a0 = addr;
                let a1 = advance(&i, a0);
                let a2 = advance(&i, a1);
                let a3 = advance(&i, a2);
                addr = advance(&i, a3);
                let v0 = x4[a0];
                let v1 = x4[a1];
                let v2 = x4[a2];
                let v3 = x4[a3];
                nan4 = nan4 | is_nan4(v0) | is_nan4(v1) | is_nan4(v2) | is_nan4(v3);
                let l01 = select(v1, v0, v0 < v1);
                let l23 = select(v3, v2, v2 < v3);
                let h01 = select(v1, v0, v0 > v1);
                let h23 = select(v3, v2, v2 > v3);
                let l = select(l23, l01, l01 < l23);
                let h = select(h23, h01, h01 > h23);
                lo4 = select(lo4, l, l < lo4);
                hi4 = select(hi4, h, h > hi4);
            }
        }
        for (; u < end; u = u + LANES) {
            var v: vec4<f32>;
            if (vec4_loads) {
                v = x4[addr];
            } else {
                v = vec4<f32>(x[addr]);
            }
            nan4 = nan4 | is_nan4(v);
            lo4 = select(lo4, v, v < lo4);
            hi4 = select(hi4, v, v > hi4);
            addr = advance(&i, addr);
        }
        // Per tensor: workgroup 0 folds the elements after the last whole vec4.
        if (g == 0u && lid.x == 0u) {
            for (var j = params.tail; j < params.n; j = j + 1u) {
                let v = vec4<f32>(x[j]);
                nan4 = nan4 | is_nan4(v);
                lo4 = select(lo4, v, v < lo4);
                hi4 = select(hi4, v, v > hi4);
            }
        }
    }
    var lo = min(min(lo4.x, lo4.y), min(lo4.z, lo4.w));
    var hi = max(max(hi4.x, hi4.y), max(hi4.z, hi4.w));
    if (any(nan4)) {
        lo = from_bits(0x7fc00000u);
        hi = lo;
    }
    let r = reduce_workgroup(lid.x, lo, hi);
    if (lid.x == 0u && c < params.channels) {
        let k = 2u * (c * params.groups + g);
        partials[k] = r.x;
        partials[k + 1u] = r.y;
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
    let r = reduce_workgroup(lid.x, lo, hi);
    if (lid.x == 0u && c < params.channels) {
        minmax[c] = r.x;
        minmax[params.channels + c] = r.y;
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
