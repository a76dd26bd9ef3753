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
//
// Entry points: forward (0, 1, 2), backward (0, 1, 2, 3).
// Dispatch: workgroup size (WG, 1, 1), WG an override constant (default 256); 1-D grid over n
// tiled over x and y (flat index gid.x + gid.y * num_workgroups.x * WG, bounds-checked).

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
