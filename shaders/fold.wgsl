// fold.wgsl: BatchNorm folding into a conv (any rank), a transposed conv, or a linear layer
// requires: lib/float_bits.wgsl
// requires: lib/exact_float.wgsl (sqrt_rn, div_rn)
// (torch.nn.utils.fusion.fuse_conv_bn_weights / fuse_linear_bn_weights). Per output channel c:
//     r  = 1 / sqrt(running_var + eps)      (sqrt_rn, div_rn: correctly rounded, as the CPU)
//     s  = gamma * r
//     W' = W * s
//     b' = (b - running_mean) * r * gamma + beta        (conv)
//     b' = (b - running_mean) * s + beta                (linear)
// affine=False BN and a missing bias are handled by the host uploading ones/zeros.
// The folded weight is bit-exact with src/reference/fold.rs (r and s correctly rounded, then
// one multiply); the bias matches to within 1e-5 (a driver may contract its mul-add to fma).
//
// Bindings (group 0):
//   @group(0) @binding(0) params: uniform Params  n (weight elements), inner (conv/linear:
//                                 elements per output channel; transpose: product of the kernel
//                                 dims), d1 (transpose: weight dim 1 = Cout/g), cin_per_group
//                                 (transpose: Cin/g), transpose (0/1), bias_len (output channels),
//                                 bn_channels (1 broadcasts one BN channel), linear (0/1), eps,
//                                 rows (n / inner: weight rows of one output channel each)
//   @group(0) @binding(1) w:      storage, read array<f32>  weight, n elements, row-major
//   @group(0) @binding(2) bn:     storage, read array<f32>  4*C: gamma[C], beta[C],
//                                 running_mean[C], running_var[C]
//   @group(0) @binding(3) bias:   storage, read array<f32>  conv/linear bias, bias_len (zeros if none)
//   @group(0) @binding(4) w_out:  storage, read_write array<f32>  folded weight, n elements
//   @group(0) @binding(5) b_out:  storage, read_write array<f32>  folded bias, bias_len
//   @group(0) @binding(6) w4:     storage, read array<vec4<f32>>  w as vec4s (fold_rows4)
//   @group(0) @binding(7) w_out4: storage, read_write array<vec4<f32>>  w_out as vec4s (fold_rows4)
//   @group(0) @binding(8) scale:  storage, read_write array<f32>  s per output channel, bias_len
//                                 (written by fold_scale, read by the weight kernels)
//
// Entry points and dispatch (workgroup size (WG, 1, 1), WG an override constant, default 256):
//   fold_scale (0, 2, 3, 5, 8): per output channel o: s[o] and b'[o], computed once. 1-D grid
//     over bias_len, tiled over x and y (flat index gid.x + gid.y * num_workgroups.x * WG,
//     bounds-checked). Runs before the weight kernel in the same submission.
//   fold_rows4 (0, 6, 7, 8): inner % 4 == 0. Row r = wid.y + wid.z * num_workgroups.y (r < rows)
//     holds inner contiguous elements of one output channel; invocation gid.x of the row reads
//     s once and scales its vec4s 4*gid.x..4*gid.x+3 of the row (those below inner / 4).
//     Dispatch: (ceil(inner / 16 / WG), rows tiled over y and z).
//   fold_weight (0, 1, 4, 8): any layout. Invocation t scales elements 4t..4t+3 (below n).
//     Dispatch: 1-D grid over ceil(n / 4) invocations, tiled as fold_scale's.
// Output channel of weight row r (elements r*inner..): r (conv, linear); transpose, weight
// [Cin, Cout/g, k...]: (i0 / (Cin/g)) * (Cout/g) + j with i0 = r / d1, j = r % d1.

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
    rows: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> w: array<f32>;
@group(0) @binding(2) var<storage, read> bn: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> w_out: array<f32>;
@group(0) @binding(5) var<storage, read_write> b_out: array<f32>;
@group(0) @binding(6) var<storage, read> w4: array<vec4<f32>>;
@group(0) @binding(7) var<storage, read_write> w_out4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> scale: array<f32>;

fn bn_index(oc: u32) -> u32 {
    if (params.bn_channels == 1u) {
        return 0u;
    }
    return oc;
}

// Output channel of weight row r.
fn row_channel(r: u32) -> u32 {
    if (params.transpose != 0u) {
        let i0 = r / params.d1;
        let j = r % params.d1;
        return (i0 / params.cin_per_group) * params.d1 + j;
    }
    return r;
}

@compute @workgroup_size(WG)
fn fold_scale(@builtin(global_invocation_id) gid: vec3<u32>,
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
    let r = div_rn(1.0, sqrt_rn(bn[3u * nc + c] + params.eps));
    let s = gamma * r;
    scale[o] = s;
    if (params.linear != 0u) {
        b_out[o] = (bias[o] - mean) * s + beta;
    } else {
        b_out[o] = (bias[o] - mean) * r * gamma + beta;
    }
}

@compute @workgroup_size(WG)
fn fold_rows4(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let r = wid.y + wid.z * nwg.y;
    let inner4 = params.inner / 4u;
    let first = 4u * gid.x;
    if (r >= params.rows || first >= inner4) {
        return;
    }
    let s = scale[row_channel(r)];
    let base = r * inner4 + first;
    let count = min(4u, inner4 - first);
    for (var k = 0u; k < count; k = k + 1u) {
        w_out4[base + k] = w4[base + k] * s;
    }
}

@compute @workgroup_size(WG)
fn fold_weight(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * (nwg.x * WG);
    // t < ceil(n / 4), so 4 * t does not wrap.
    if (t >= params.n / 4u + select(0u, 1u, (params.n & 3u) != 0u)) {
        return;
    }
    let first = 4u * t;
    let count = min(4u, params.n - first);
    for (var k = 0u; k < count; k = k + 1u) {
        let i = first + k;
        w_out[i] = w[i] * scale[row_channel(i / params.inner)];
    }
}
