// fake_quant.wgsl: fake quantization per tensor or per channel, forward (y, optionally the
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
//                                                       quant_min, quant_max
//   @group(0) @binding(1) x:      storage, read   array<f32>  input, n elements
//   @group(0) @binding(2) qp:     storage, read   array<u32>  qparams, 3*C words: scale[C] (f32
//                                                       bits), inv[C] (f32 bits, 1/scale),
//                                                       zero_point[C] (i32 bits); written by the
//                                                       host or by observer.wgsl `calc_qparams`
//   @group(0) @binding(3) out:    storage, read_write array<f32>  forward: y; backward: dx
//   @group(0) @binding(4) mask:   storage, read_write array<f32>  forward_mask: 1.0 in range, else 0.0
//   @group(0) @binding(5) dy:     storage, read   array<f32>  backward: upstream gradient
//
// Entry points: forward (0-3), forward_mask (0-4), backward (0-3, 5).
// Dispatch: workgroup size (WG, 1, 1), WG an override constant (default 256); 1-D grid over n
// elements tiled over x and y (flat index gid.x + gid.y * num_workgroups.x * WG, bounds-checked).
// Channel of element i: (i / inner) % C.

override WG: u32 = 256u;

struct Params {
    n: u32,
    inner: u32,
    channels: u32,
    quant_min: i32,
    quant_max: i32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> qp: array<u32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read_write> mask: array<f32>;
@group(0) @binding(5) var<storage, read> dy: array<f32>;

fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

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
    let i = flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    out[i] = fake_quant_one(x[i], channel_of(i)).y;
}

@compute @workgroup_size(WG)
fn forward_mask(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
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
    let i = flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    let r = fake_quant_one(x[i], channel_of(i));
    out[i] = select(0.0, dy[i], r.in_range);
}
