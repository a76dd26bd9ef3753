// activation.wgsl: elementwise activations, forward and backward, selected at run time by
// requires: lib/float_bits.wgsl
// requires: lib/activation.wgsl
// params.act: 0 = identity, 1 = ReLU, 2 = ReLU6, 3 = LeakyReLU (slope params.slope),
// 4 = Hardswish. Matches src/reference/activation.rs exactly, except Hardswish, whose two
// divisions (by 6 forward, by 3 backward) are as accurate as the device's f32 division.
//   forward:  relu(x) = x < 0 ? 0 : x;  relu6(x) = clamp(x, 0, 6) (-0.0 stays -0.0);
//             leaky(x) = x > 0 ? x : x * slope;  hardswish(x) = x * clamp(x + 3, 0, 6) / 6;
//             NaN propagates (y = x), tested on the bit pattern, not with WGSL min/max or x != x.
//   backward: relu: dx = x <= 0 ? 0 : dy; relu6: dx = (x <= 0 or x >= 6) ? 0 : dy (NaN x passes
//             dy, as PyTorch's threshold_backward / hardtanh_backward do);
//             leaky: dx = x > 0 ? dy : dy * slope (NaN x gives dy * slope);
//             hardswish: dx = x < -3 ? 0 : (x >= 3 ? dy : dy * (x / 3 + 0.5)) (NaN x gives NaN).
//
// Bindings (group 0):
//   @group(0) @binding(0) params: uniform Params  n (elements), act (0 identity, 1 relu, 2 relu6,
//                                 3 leaky_relu, 4 hardswish), slope (leaky_relu's negative slope)
//   @group(0) @binding(1) x:      storage, read array<f32>  input
//   @group(0) @binding(2) out:    storage, read_write array<f32>  forward: y; backward: dx
//   @group(0) @binding(3) dy:     storage, read array<f32>  backward: upstream gradient
//   @group(0) @binding(4) x4:     storage, read array<vec4<f32>>  x as vec4s (the *4 forms)
//   @group(0) @binding(5) out4:   storage, read_write array<vec4<f32>>  out as vec4s
//   @group(0) @binding(6) dy4:    storage, read array<vec4<f32>>  dy as vec4s
//
// Entry points: forward (0, 1, 2), backward (0, 1, 2, 3); forward4 (0, 4, 5), backward4
// (0, 4, 5, 6) for n a multiple of 4: the same arithmetic per element, on vec4s, ITEMS4 of
// them per invocation (on a CPU adapter an invocation per element costs 2-3x a copy of the
// same bytes; this runs at about copy speed).
// Dispatch: workgroup size (WG, 1, 1), WG an override constant (default 256); forward /
// backward: 1-D grid over n tiled over x and y (flat index gid.x + gid.y * num_workgroups.x *
// WG, bounds-checked); forward4 / backward4: 1-D grid over ceil(n / 4 / ITEMS4) invocations,
// workgroup w (wid.x + wid.y * num_workgroups.x) taking the WG * ITEMS4 vec4s from
// w * WG * ITEMS4, invocation l those at l + k * WG (k < ITEMS4), bounds-checked.

override WG: u32 = 256u;

struct Params {
    n: u32,
    act: u32,
    slope: f32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;
@group(0) @binding(4) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(5) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(6) var<storage, read> dy4: array<vec4<f32>>;

// vec4s per invocation of forward4 / backward4.
const ITEMS4: u32 = 4u;

fn act_forward(v: f32) -> f32 {
    return act_apply(v, params.act, params.slope);
}

fn act_backward(v: f32, d: f32) -> f32 {
    return act_grad(v, d, params.act, params.slope);
}

@compute @workgroup_size(WG)
fn forward(@builtin(global_invocation_id) gid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= params.n) {
        return;
    }
    out[i] = act_forward(x[i]);
}

@compute @workgroup_size(WG)
fn backward(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= params.n) {
        return;
    }
    out[i] = act_backward(x[i], dy[i]);
}

// The first vec4 of invocation `li` of workgroup `wid` (forward4 / backward4).
fn base4(li: u32, wid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return (wid.x + wid.y * nwg.x) * WG * ITEMS4 + li;
}

@compute @workgroup_size(WG)
fn forward4(@builtin(local_invocation_index) li: u32,
            @builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let base = base4(li, wid, nwg);
    let n4 = params.n / 4u;
    for (var k = 0u; k < ITEMS4; k = k + 1u) {
        let i = base + k * WG;
        if (i < n4) {
            let v = x4[i];
            out4[i] = vec4<f32>(act_forward(v.x), act_forward(v.y), act_forward(v.z),
                                act_forward(v.w));
        }
    }
}

@compute @workgroup_size(WG)
fn backward4(@builtin(local_invocation_index) li: u32,
             @builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let base = base4(li, wid, nwg);
    let n4 = params.n / 4u;
    for (var k = 0u; k < ITEMS4; k = k + 1u) {
        let i = base + k * WG;
        if (i < n4) {
            let v = x4[i];
            let d = dy4[i];
            out4[i] = vec4<f32>(act_backward(v.x, d.x), act_backward(v.y, d.y),
                                act_backward(v.z, d.z), act_backward(v.w, d.w));
        }
    }
}
