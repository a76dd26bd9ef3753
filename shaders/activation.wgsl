// activation.wgsl: elementwise activations, forward and backward, selected at run time by
// params.act: 0 = identity, 1 = ReLU, 2 = ReLU6. Matches src/reference/activation.rs exactly.
//   forward:  relu(x) = x < 0 ? 0 : x;  relu6(x) = clamp(x, 0, 6) (-0.0 stays -0.0);
//             NaN propagates (y = x), tested on the bit pattern, not with WGSL min/max or x != x.
//   backward: dx = 0 where relu: x <= 0, relu6: x <= 0 or x >= 6; else dy (NaN x passes dy,
//             as PyTorch's threshold_backward / hardtanh_backward do).
//
// Bindings (group 0):
//   @group(0) @binding(0) params: uniform Params  n (elements), act (0 identity, 1 relu, 2 relu6)
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
    _pad0: u32,
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> dy: array<f32>;

fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}

// relu(x) = x < 0 ? 0 : x; relu6(x) = clamp(x, 0, 6); -0.0 stays -0.0, NaN stays NaN.
fn act_forward(v: f32) -> f32 {
    if (params.act == 0u || is_nan(v)) {
        return v;
    }
    var y = select(v, 0.0, v < 0.0);
    if (params.act == 2u) {
        y = select(y, 6.0, v > 6.0);
    }
    return y;
}

// Whether the gradient passes: relu zeroes it where x <= 0, relu6 where x <= 0 or x >= 6
// (PyTorch's threshold_backward / hardtanh_backward), so a NaN x passes it.
fn act_passes(v: f32) -> bool {
    if (params.act == 0u || is_nan(v)) {
        return true;
    }
    if (params.act == 2u) {
        return v > 0.0 && v < 6.0;
    }
    return v > 0.0;
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
    out[i] = select(0.0, dy[i], act_passes(x[i]));
}
