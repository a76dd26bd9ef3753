// fold.wgsl: BatchNorm folding into a conv (any rank), a transposed conv, or a linear layer
// (torch.nn.utils.fusion.fuse_conv_bn_weights / fuse_linear_bn_weights). Per output channel c:
//     r  = 1 / sqrt(running_var + eps)
//     W' = W * (gamma * r)
//     b' = (b - running_mean) * r * gamma + beta        (conv)
//     b' = (b - running_mean) * (gamma * r) + beta      (linear)
// affine=False BN and a missing bias are handled by the host uploading ones/zeros.
// Matches src/reference/fold.rs to within 1e-5 (sqrt and division are not correctly
// rounded in WGSL).
//
// Bindings (group 0):
//   @group(0) @binding(0) params: uniform Params  n (weight elements), inner (conv/linear:
//                                 elements per output channel; transpose: product of the kernel
//                                 dims), d1 (transpose: weight dim 1 = Cout/g), cin_per_group
//                                 (transpose: Cin/g), transpose (0/1), bias_len (output channels),
//                                 bn_channels (1 broadcasts one BN channel), linear (0/1), eps
//   @group(0) @binding(1) w:      storage, read array<f32>  weight, n elements, row-major
//   @group(0) @binding(2) bn:     storage, read array<f32>  4*C: gamma[C], beta[C],
//                                 running_mean[C], running_var[C]
//   @group(0) @binding(3) bias:   storage, read array<f32>  conv/linear bias, bias_len (zeros if none)
//   @group(0) @binding(4) w_out:  storage, read_write array<f32>  folded weight, n elements
//   @group(0) @binding(5) b_out:  storage, read_write array<f32>  folded bias, bias_len
//
// Entry points: fold_weight (0, 1, 2, 4), fold_bias (0, 2, 3, 5).
// Dispatch: workgroup size (WG, 1, 1), WG an override constant (default 256); 1-D grid over n
// (fold_weight) or bias_len (fold_bias), tiled over x and y (flat index
// gid.x + gid.y * num_workgroups.x * WG, bounds-checked).
// Output channel of weight element i: i / inner (conv, linear); transpose, weight
// [Cin, Cout/g, k...]: (i0 / (Cin/g)) * (Cout/g) + j with i0 = i / (d1*inner), j = (i / inner) % d1.

override WG: u32 = 256u;

struct Params {
    n: u32,
    inner: u32,
    d1: u32,
    cin_per_group: u32,
    transpose: u32,
    bias_len: u32,
    bn_channels: u32,
    linear: u32,
    eps: f32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> bn: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> w_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> b_out: array<f32>;

fn bn_index(oc: u32) -> u32 {
    if (params.bn_channels == 1u) {
        return 0u;
    }
    return oc;
}

fn rstd(c: u32) -> f32 {
    let var_c = bn[3u * params.bn_channels + c];
    return 1.0 / sqrt(var_c + params.eps);
}

@compute @workgroup_size(WG)
fn fold_weight(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= params.n) {
        return;
    }
    var oc: u32;
    if (params.transpose != 0u) {
        let i0 = i / (params.d1 * params.inner);
        let j = (i / params.inner) % params.d1;
        oc = (i0 / params.cin_per_group) * params.d1 + j;
    } else {
        oc = i / params.inner;
    }
    let c = bn_index(oc);
    let gamma = bn[c];
    w_out[i] = w[i] * (gamma * rstd(c));
}

@compute @workgroup_size(WG)
fn fold_bias(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let o = gid.x + gid.y * (nwg.x * WG);
    if (o >= params.bias_len) {
        return;
    }
    let c = bn_index(o);
    let nc = params.bn_channels;
    let gamma = bn[c];
    let beta = bn[nc + c];
    let mean = bn[2u * nc + c];
    let r = rstd(c);
    if (params.linear != 0u) {
        b_out[o] = (bias[o] - mean) * (gamma * r) + beta;
    } else {
        b_out[o] = (bias[o] - mean) * r * gamma + beta;
    }
}
