// fake_quant.wgsl: fake quantization per tensor or per channel, forward (y, optionally the
// requires: lib/float_bits.wgsl
// straight-through mask) and backward (dx = dy * mask). Bit-exact with
// src/reference/fake_quant.rs (PyTorch's CPU kernel):
//     r  = round(x * inv)            (round: ties to even; inv = 1/scale, precomputed)
//     qf = r + f32(zp)
//     q  = clamp(qf, qmin, qmax)     (NaN-propagating)
//     y  = (q - f32(zp)) * scale
//     mask = qmin <= qf <= qmax      (on the rounded, unclamped value)
// NaN x gives y = x (NaN) and mask 0 (tested on the bit pattern, not with x != x);
// +inf gives quant_max, -inf quant_min (mask 0). Masked-out gradients are exactly +0.0.
//
// Bindings (group 0):
//   @group(0) @binding(0) params: uniform Params        sizes: n (elements), inner (product of
//                                                       the dims after the channel axis; 1 per
//                                                       tensor), channels (C; 1 per tensor),
//                                                       quant_min, quant_max, n4 (n / 4),
//                                                       first (scalar kernels: first element),
//                                                       rows (n / inner, rows kernels)
//   @group(0) @binding(1) x:      storage, read   array<f32>  input, n elements
//   @group(0) @binding(2) qp:     storage, read   array<u32>  qparams, 3*C words: scale[C] (f32
//                                                       bits), inv[C] (f32 bits, 1/scale),
//                                                       zero_point[C] (i32 bits); written by the
//                                                       host or by observer.wgsl `calc_qparams`
//   @group(0) @binding(3) out:    storage, read_write array<f32>  forward: y; backward: dx
//   @group(0) @binding(4) mask:   storage, read_write array<f32>  forward_mask: 1.0 in range, else 0.0
//   @group(0) @binding(5) dy:     storage, read   array<f32>  backward: upstream gradient
//   @group(0) @binding(6) x4:     storage, read   array<vec4<f32>>  x as vec4s (vec4 kernels)
//   @group(0) @binding(7) out4:   storage, read_write array<vec4<f32>>  out as vec4s
//   @group(0) @binding(8) mask4:  storage, read_write array<vec4<f32>>  mask as vec4s
//   @group(0) @binding(9) dy4:    storage, read   array<vec4<f32>>  dy as vec4s
//
// Entry points (bindings):
//   forward (0-3), forward_mask (0-4), backward (0-3, 5): one element per invocation, element
//     i = first + flat index (first = 0, or 4*n4 when they do the tail of a vec4 launch).
//     Dispatch: 1-D grid over the n - first elements, tiled over x and y (flat index
//     gid.x + gid.y * num_workgroups.x * WG, bounds-checked). Channel of element i:
//     (i / inner) % C.
//   forward_vec4 (0, 2, 6, 7), forward_mask_vec4 (0, 2, 6-8), backward_vec4 (0, 2, 6, 7, 9):
//     per tensor (C = 1). Invocation t does vec4s 4t..4t+3 (those below n4 = n / 4); the 0-3
//     tail elements are left to a scalar launch with first = 4*n4. Dispatch: 1-D grid over
//     ceil(n4 / 4) invocations, tiled as above.
//   forward_rows (0, 2, 6, 7), forward_mask_rows (0, 2, 6-8), backward_rows (0, 2, 6, 7, 9):
//     per channel with inner % 4 == 0. Row r (= wid.y + wid.z * num_workgroups.y, r < rows =
//     n / inner) is one channel block of inner elements, channel r % C; invocation gid.x of
//     the row does its vec4s k*gid.x .. k*gid.x + k - 1 (those below inner / 4), k =
//     ROW_ITEMS (16) for forward_rows, 4 for the other two. Dispatch: (ceil(inner / (4k) /
//     WG), rows tiled over y and z). Why 16 for the forward: its qparams (three loads, each a
//     per-lane loop on a CPU adapter) weigh on 8 bytes per element; 0.81-0.83 of copy with 4,
//     0.83-0.89 with 16 (lavapipe, 16x64x128x128, alternating binaries); the mask kernel
//     (12 bytes per element) measured 0.78 with 16 against 0.93-0.95 with 4.
//   The vec4 kernels do the same operations as the scalar ones (componentwise, the clamp as
//   two selects, which equals min/max on the non-NaN values and passes NaN through), so the
//   results are bit-identical; they read each qparam once per invocation.
// Dispatch: workgroup size (WG, 1, 1), WG an override constant (default 256).

override WG: u32 = 256u;

struct Params {
    n: u32,
    inner: u32,
    channels: u32,
    quant_min: i32,
    quant_max: i32,
    n4: u32,
    first: u32,
    rows: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> qp: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> mask: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;
@group(0) @binding(6) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> mask4: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read> dy4: array<vec4<f32>>;

fn flat_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * (nwg.x * WG);
}

fn channel_of(i: u32) -> u32 {
    if (params.channels <= 1u) {
        return 0u;
    }
    return (i / params.inner) % params.channels;
}

struct Fq {
    y: f32,
    in_range: bool,
}

fn fake_quant_one(v: f32, c: u32) -> Fq {
    if (is_nan(v)) {
        return Fq(v, false);
    }
    let scale = bitcast<f32>(qp[c]);
    let inv = bitcast<f32>(qp[params.channels + c]);
    let zp = f32(bitcast<i32>(qp[2u * params.channels + c]));
    let qmin = f32(params.quant_min);
    let qmax = f32(params.quant_max);
    let qf = round(v * inv) + zp;
    // NaN-propagating clamp (qf is NaN for 0 * inf when 1/scale overflows).
    let q = select(min(max(qf, qmin), qmax), qf, is_nan(qf));
    return Fq((q - zp) * scale, qmin <= qf && qf <= qmax);
}

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = params.first + flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    out[i] = fake_quant_one(x[i], channel_of(i)).y;
}

@compute @workgroup_size(WG)
fn forward_mask(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = params.first + flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    let r = fake_quant_one(x[i], channel_of(i));
    out[i] = r.y;
    mask[i] = select(0.0, 1.0, r.in_range);
}

@compute @workgroup_size(WG)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = params.first + flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    let r = fake_quant_one(x[i], channel_of(i));
    out[i] = select(0.0, dy[i], r.in_range);
}

// ---- vec4 kernels --------------------------------------------------------------------------

struct Qp {
    scale: f32,
    inv: f32,
    zp: f32,
}

struct Fq4 {
    y: vec4<f32>,
    in_range: vec4<bool>,
}

fn is_nan4(v: vec4<f32>) -> vec4<bool> {
    return (bitcast<vec4<u32>>(v) & vec4<u32>(0x7fffffffu)) > vec4<u32>(0x7f800000u);
}

// fake_quant_one on four elements of one channel. qf is never -0.0 (zp and the bounds are
// integers, and -0 + +0 = +0), so the two selects equal min/max on non-NaN qf; a NaN qf fails
// both comparisons and passes through, as in fake_quant_one.
fn fake_quant4(v: vec4<f32>, q: Qp) -> Fq4 {
    let qmin = vec4<f32>(f32(params.quant_min));
    let qmax = vec4<f32>(f32(params.quant_max));
    let qf = round(v * q.inv) + q.zp;
    let lo = select(qf, qmin, qf < qmin);
    let c = select(lo, qmax, qf > qmax);
    let y = select((c - q.zp) * q.scale, v, is_nan4(v));
    return Fq4(y, (qmin <= qf) & (qf <= qmax));
}

// Per-tensor qparams, read at constant indices (so every invocation reads the same words).
fn qp_tensor() -> Qp {
    return Qp(bitcast<f32>(qp[0]), bitcast<f32>(qp[1]), f32(bitcast<i32>(qp[2])));
}

fn qp_channel(c: u32) -> Qp {
    let nc = params.channels;
    return Qp(bitcast<f32>(qp[c]), bitcast<f32>(qp[nc + c]), f32(bitcast<i32>(qp[2u * nc + c])));
}

fn forward4(t: u32, q: Qp) {
    out4[t] = fake_quant4(x4[t], q).y;
}

fn forward_mask4(t: u32, q: Qp) {
    let r = fake_quant4(x4[t], q);
    out4[t] = r.y;
    mask4[t] = select(vec4<f32>(0.0), vec4<f32>(1.0), r.in_range);
}

fn backward4(t: u32, q: Qp) {
    let r = fake_quant4(x4[t], q);
    out4[t] = select(vec4<f32>(0.0), dy4[t], r.in_range);
}

@compute @workgroup_size(WG)
fn forward_vec4(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = qp_tensor();
    let t = 4u * flat_index(gid, nwg);
    if (t < params.n4) { forward4(t, q); }
    if (t + 1u < params.n4) { forward4(t + 1u, q); }
    if (t + 2u < params.n4) { forward4(t + 2u, q); }
    if (t + 3u < params.n4) { forward4(t + 3u, q); }
}

@compute @workgroup_size(WG)
fn forward_mask_vec4(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = qp_tensor();
    let t = 4u * flat_index(gid, nwg);
    if (t < params.n4) { forward_mask4(t, q); }
    if (t + 1u < params.n4) { forward_mask4(t + 1u, q); }
    if (t + 2u < params.n4) { forward_mask4(t + 2u, q); }
    if (t + 3u < params.n4) { forward_mask4(t + 3u, q); }
}

@compute @workgroup_size(WG)
fn backward_vec4(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let q = qp_tensor();
    let t = 4u * flat_index(gid, nwg);
    if (t < params.n4) { backward4(t, q); }
    if (t + 1u < params.n4) { backward4(t + 1u, q); }
    if (t + 2u < params.n4) { backward4(t + 2u, q); }
    if (t + 3u < params.n4) { backward4(t + 3u, q); }
}

// vec4s per invocation of forward_rows (ROW_VEC4_PER_INVOCATION in src/kernels/fake_quant.rs).
const ROW_ITEMS: u32 = 16u;

// Row r of the rows kernels: the channel's qparams, the row's first vec4 and its vec4 count
// (0 for the padding rows of a z-tiled grid).
struct Row {
    q: Qp,
    base: u32,
    len: u32,
}

fn row_of(wid: vec3<u32>, nwg: vec3<u32>) -> Row {
    let r = wid.y + wid.z * nwg.y;
    let inner4 = params.inner / 4u;
    return Row(qp_channel(r % params.channels), r * inner4, select(0u, inner4, r < params.rows));
}

@compute @workgroup_size(WG)
fn forward_rows(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = row_of(wid, nwg);
    let j = ROW_ITEMS * gid.x;
    for (var k = 0u; k < ROW_ITEMS; k = k + 1u) {
        if (j + k < row.len) { forward4(row.base + j + k, row.q); }
    }
}

@compute @workgroup_size(WG)
fn forward_mask_rows(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(workgroup_id) wid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = row_of(wid, nwg);
    let j = 4u * gid.x;
    if (j < row.len) { forward_mask4(row.base + j, row.q); }
    if (j + 1u < row.len) { forward_mask4(row.base + j + 1u, row.q); }
    if (j + 2u < row.len) { forward_mask4(row.base + j + 2u, row.q); }
    if (j + 3u < row.len) { forward_mask4(row.base + j + 3u, row.q); }
}

@compute @workgroup_size(WG)
fn backward_rows(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = row_of(wid, nwg);
    let j = 4u * gid.x;
    if (j < row.len) { backward4(row.base + j, row.q); }
    if (j + 1u < row.len) { backward4(row.base + j + 1u, row.q); }
    if (j + 2u < row.len) { backward4(row.base + j + 2u, row.q); }
    if (j + 3u < row.len) { backward4(row.base + j + 3u, row.q); }
}
