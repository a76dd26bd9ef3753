// batch_norm.wgsl: BatchNorm2d on NCHW tensors (torch.nn.functional.batch_norm), forward and
// requires: lib/float_bits.wgsl
// requires: lib/activation.wgsl
// backward, matching src/reference/batch_norm.rs (which reduces in f64) to about 1e-6:
//   statistics (training): per channel over N, H, W (M = N*H*W values), in two passes for
//     numerical soundness: mean = (sum x) / M, then var = (sum (x - mean)^2) / M (biased);
//     each pass sums in f32 per thread (strided) and then pairwise (tree) in workgroup memory,
//     then over the partials of a channel with another tree;
//   running stats (training): rm' = (1 - momentum) * rm + momentum * mean,
//     rv' = (1 - momentum) * rv + momentum * var * M / (M - 1)  (unbiased);
//   eval statistics: mean = running mean, invstd = 1 / sqrt(running var + eps);
//   normalize: pre = (x - mean) * invstd * gamma + beta, y = act(pre)  (0 none, 1 relu, 2 relu6,
//     3 leaky_relu with slope, 4 hardswish, as activation.wgsl; optionally also writes pre);
//   backward: dy' = act_backward(act_x, dy) (act_x: the activation's input, or for relu / relu6
//     its output, which gives the same mask; act = 0 passes dy), then per channel
//     sum dy' and sum dy' * xhat with xhat = (x - mean) * invstd, then
//     training: dx = gamma*invstd * (dy' - (sum dy' + xhat * sum dy'*xhat) / M)
//     eval:     dx = gamma*invstd * dy'
//     and optionally dx / divisor[c] (the QAT backward's d conv_out = dBN_in / s).
//
// Bindings (group 0):
//   @group(0) @binding(0) params:   uniform Params  n (elements N*C*H*W), channels (C), hw (H*W),
//                                   m (values per channel N*H*W), groups (G, partial workgroups
//                                   per channel), act (0..4), write_pre (0/1), training
//                                   (backward_dx: 0 eval form, 1 training form), eps, momentum,
//                                   has_divisor (0/1), slope (leaky_relu's negative slope)
//   @group(0) @binding(1) x:        storage, read array<f32>  input (backward: the forward's input)
//   @group(0) @binding(2) partials: storage, read_write array<f32>  2*C*G partial sums: value r
//                                   of partial g of channel c at r*C*G + c*G + g
//   @group(0) @binding(3) bn:       storage, read array<f32>  4*C: gamma[C], beta[C],
//                                   running_mean[C], running_var[C] (kernels::GpuBatchNorm)
//   @group(0) @binding(4) stats:    storage, read_write array<f32>  2*C: mean[C], invstd[C]
//   @group(0) @binding(5) running:  storage, read_write array<f32>  2*C: updated running_mean[C],
//                                   running_var[C] (eval: copies)
//   @group(0) @binding(6) y:        storage, read_write array<f32>  normalize: y; backward_dx: dx
//   @group(0) @binding(7) pre:      storage, read_write array<f32>  normalize: pre-activation
//                                   output when write_pre = 1 (else a dummy)
//   @group(0) @binding(8) dy:       storage, read array<f32>  backward: upstream gradient
//   @group(0) @binding(9) act_x:    storage, read array<f32>  backward: where the activation
//                                   mask is evaluated (dummy when act = 0)
//   @group(0) @binding(10) grads:   storage, read_write array<f32>  2*C: sum dy' (d beta)[C],
//                                   sum dy'*xhat (d gamma)[C]
//   @group(0) @binding(11) divisor: storage, read array<f32>  backward_dx: C per-channel divisors
//                                   of dx when has_divisor = 1 (the QAT divide-back), else a dummy
//
// Entry points and dispatch (workgroup size WGR = 256, fixed: it sizes workgroup memory):
//   sum_partial      (0,1,2):     grid (G, Cy, Cz), channel c = wid.y + wid.z * num_workgroups.y;
//                                 workgroup (g, c) sums values j = g*WGR + lid, stepping G*WGR.
//   mean_final       (0,2,4):     grid (1, Cy, Cz): mean of channel c from its G partials.
//   ssd_partial      (0,1,2,4):   grid (G, Cy, Cz): partial sums of (x - mean)^2.
//   var_final        (0,2,3,4,5): grid (1, Cy, Cz): variance, invstd, running-stat update.
//   eval_stats       (0,3,4,5):   1-D grid over C (flat index gid.x + gid.y * num_workgroups.x * WGR).
//   normalize        (0,1,3,4,6,7): 1-D grid over n, same tiling.
//   backward_partial (0,1,2,4,8,9): grid (G, Cy, Cz): partial sum dy' and sum dy' * xhat.
//   backward_final   (0,2,10):    grid (1, Cy, Cz): reduces the partials into grads.
//   backward_dx      (0,1,3,4,6,8,9,10,11): 1-D grid over n.
//   normalize8, backward_dx8: normalize / backward_dx for 8 consecutive elements per
//                                 invocation (1-D grid over n / 8), used when H*W is a multiple
//                                 of 8 so the 8 share a channel: its statistics and parameters
//                                 are loaded once (same arithmetic per element).
// Value j of channel c is element (j / hw) * C * hw + c * hw + j % hw.

const WGR: u32 = 256u;

struct Params {
    n: u32,
    channels: u32,
    hw: u32,
    m: u32,
    groups: u32,
    act: u32,
    write_pre: u32,
    training: u32,
    eps: f32,
    momentum: f32,
    has_divisor: u32,
    slope: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> partials: array<f32>;
@group(0) @binding(3) var<storage, read> bn: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;
@group(0) @binding(5) var<storage, read_write> running: array<f32>;
@group(0) @binding(6) var<storage, read_write> y: array<f32>;
@group(0) @binding(7) var<storage, read_write> pre: array<f32>;
@group(0) @binding(8) var<storage, read> dy: array<f32>;
@group(0) @binding(9) var<storage, read> act_x: array<f32>;
@group(0) @binding(10) var<storage, read_write> grads: array<f32>;
@group(0) @binding(11) var<storage, read> divisor: array<f32>;

var<workgroup> sa: array<f32, WGR>;
var<workgroup> sb: array<f32, WGR>;

fn element_index(c: u32, j: u32) -> u32 {
    let hw = params.hw;
    return (j / hw) * (params.channels * hw) + c * hw + (j % hw);
}

fn channel_of(i: u32) -> u32 {
    return (i / params.hw) % params.channels;
}

fn flat_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * (nwg.x * WGR);
}

// Tree reduction of sa (and sb) over the workgroup; the sums land in slot 0.
fn reduce_a(lid: u32) {
    workgroupBarrier();
    for (var s = WGR / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            sa[lid] = sa[lid] + sa[lid + s];
        }
        workgroupBarrier();
    }
}

fn reduce_ab(lid: u32) {
    workgroupBarrier();
    for (var s = WGR / 2u; s > 0u; s = s >> 1u) {
        if (lid < s) {
            sa[lid] = sa[lid] + sa[lid + s];
            sb[lid] = sb[lid] + sb[lid + s];
        }
        workgroupBarrier();
    }
}

// Sum of partial row r of channel c (G values), tree-reduced; valid in every thread after the
// call (read from sa[0] after the final barrier).
fn reduce_partials(r: u32, c: u32, lid: u32) -> f32 {
    let cg = params.channels * params.groups;
    var acc = 0.0;
    for (var g = lid; g < params.groups; g = g + WGR) {
        acc = acc + partials[r * cg + c * params.groups + g];
    }
    sa[lid] = acc;
    reduce_a(lid);
    return sa[0];
}

fn act_forward(v: f32) -> f32 {
    return act_apply(v, params.act, params.slope);
}

fn act_backward(v: f32, d: f32) -> f32 {
    return act_grad(v, d, params.act, params.slope);
}

@compute @workgroup_size(WGR)
fn sum_partial(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = wid.x;
    let c = wid.y + wid.z * nwg.y;
    var acc = 0.0;
    if (c < params.channels) {
        for (var j = g * WGR + lid.x; j < params.m; j = j + params.groups * WGR) {
            acc = acc + x[element_index(c, j)];
        }
    }
    sa[lid.x] = acc;
    reduce_a(lid.x);
    if (lid.x == 0u && c < params.channels) {
        partials[c * params.groups + g] = sa[0];
    }
}

@compute @workgroup_size(WGR)
fn mean_final(@builtin(workgroup_id) wid: vec3<u32>,
              @builtin(local_invocation_id) lid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = wid.y + wid.z * nwg.y;
    if (c >= params.channels) {
        return;
    }
    let total = reduce_partials(0u, c, lid.x);
    if (lid.x == 0u) {
        stats[c] = total / f32(params.m);
    }
}

@compute @workgroup_size(WGR)
fn ssd_partial(@builtin(workgroup_id) wid: vec3<u32>,
               @builtin(local_invocation_id) lid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = wid.x;
    let c = wid.y + wid.z * nwg.y;
    var acc = 0.0;
    if (c < params.channels) {
        let mean = stats[c];
        for (var j = g * WGR + lid.x; j < params.m; j = j + params.groups * WGR) {
            let d = x[element_index(c, j)] - mean;
            acc = acc + d * d;
        }
    }
    sa[lid.x] = acc;
    reduce_a(lid.x);
    if (lid.x == 0u && c < params.channels) {
        partials[params.channels * params.groups + c * params.groups + g] = sa[0];
    }
}

@compute @workgroup_size(WGR)
fn var_final(@builtin(workgroup_id) wid: vec3<u32>,
             @builtin(local_invocation_id) lid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = wid.y + wid.z * nwg.y;
    if (c >= params.channels) {
        return;
    }
    let ssd = reduce_partials(1u, c, lid.x);
    if (lid.x == 0u) {
        let nc = params.channels;
        let mf = f32(params.m);
        let mean = stats[c];
        let var_b = ssd / mf;
        let unbiased = ssd / f32(params.m - 1u);
        stats[nc + c] = 1.0 / sqrt(var_b + params.eps);
        let mom = params.momentum;
        running[c] = (1.0 - mom) * bn[2u * nc + c] + mom * mean;
        running[nc + c] = (1.0 - mom) * bn[3u * nc + c] + mom * unbiased;
    }
}

@compute @workgroup_size(WGR)
fn eval_stats(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    let nc = params.channels;
    if (c >= nc) {
        return;
    }
    let rm = bn[2u * nc + c];
    let rv = bn[3u * nc + c];
    stats[c] = rm;
    stats[nc + c] = 1.0 / sqrt(rv + params.eps);
    running[c] = rm;
    running[nc + c] = rv;
}

@compute @workgroup_size(WGR)
fn normalize(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    let c = channel_of(i);
    let nc = params.channels;
    let v = (x[i] - stats[c]) * stats[nc + c] * bn[c] + bn[nc + c];
    if (params.write_pre != 0u) {
        pre[i] = v;
    }
    y[i] = act_forward(v);
}

// dy after the activation's backward.
fn dy_eff(i: u32) -> f32 {
    let d = dy[i];
    if (params.act == 0u) {
        return d;
    }
    return act_backward(act_x[i], d);
}

@compute @workgroup_size(WGR)
fn backward_partial(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(local_invocation_id) lid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let g = wid.x;
    let c = wid.y + wid.z * nwg.y;
    var acc_dy = 0.0;
    var acc_dyx = 0.0;
    if (c < params.channels) {
        let mean = stats[c];
        let invstd = stats[params.channels + c];
        for (var j = g * WGR + lid.x; j < params.m; j = j + params.groups * WGR) {
            let i = element_index(c, j);
            let d = dy_eff(i);
            acc_dy = acc_dy + d;
            acc_dyx = acc_dyx + d * ((x[i] - mean) * invstd);
        }
    }
    sa[lid.x] = acc_dy;
    sb[lid.x] = acc_dyx;
    reduce_ab(lid.x);
    if (lid.x == 0u && c < params.channels) {
        let k = c * params.groups + g;
        partials[k] = sa[0];
        partials[params.channels * params.groups + k] = sb[0];
    }
}

@compute @workgroup_size(WGR)
fn backward_final(@builtin(workgroup_id) wid: vec3<u32>,
                  @builtin(local_invocation_id) lid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = wid.y + wid.z * nwg.y;
    if (c >= params.channels) {
        return;
    }
    let cg = params.channels * params.groups;
    var acc_dy = 0.0;
    var acc_dyx = 0.0;
    for (var g = lid.x; g < params.groups; g = g + WGR) {
        acc_dy = acc_dy + partials[c * params.groups + g];
        acc_dyx = acc_dyx + partials[cg + c * params.groups + g];
    }
    sa[lid.x] = acc_dy;
    sb[lid.x] = acc_dyx;
    reduce_ab(lid.x);
    if (lid.x == 0u) {
        grads[c] = sa[0];
        grads[params.channels + c] = sb[0];
    }
}

@compute @workgroup_size(WGR)
fn backward_dx(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    let c = channel_of(i);
    let nc = params.channels;
    let invstd = stats[nc + c];
    let k = bn[c] * invstd;
    let d = dy_eff(i);
    var dx = k * d;
    if (params.training != 0u) {
        let xhat = (x[i] - stats[c]) * invstd;
        let inv_m = 1.0 / f32(params.m);
        dx = k * (d - (grads[c] + xhat * grads[nc + c]) * inv_m);
    }
    if (params.has_divisor != 0u) {
        dx = dx / divisor[c];
    }
    y[i] = dx;
}

@compute @workgroup_size(WGR)
fn normalize8(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let i0 = flat_index(gid, nwg) * 8u;
    if (i0 >= params.n) {
        return;
    }
    let c = channel_of(i0);
    let nc = params.channels;
    let mean = stats[c];
    let invstd = stats[nc + c];
    let gamma = bn[c];
    let beta = bn[nc + c];
    for (var e = 0u; e < 8u; e = e + 1u) {
        let i = i0 + e;
        let v = (x[i] - mean) * invstd * gamma + beta;
        if (params.write_pre != 0u) {
            pre[i] = v;
        }
        y[i] = act_forward(v);
    }
}

@compute @workgroup_size(WGR)
fn backward_dx8(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let i0 = flat_index(gid, nwg) * 8u;
    if (i0 >= params.n) {
        return;
    }
    let c = channel_of(i0);
    let nc = params.channels;
    let invstd = stats[nc + c];
    let k = bn[c] * invstd;
    let mean = stats[c];
    let g_dy = grads[c];
    let g_dyx = grads[nc + c];
    let inv_m = 1.0 / f32(params.m);
    var div = 1.0;
    if (params.has_divisor != 0u) {
        div = divisor[c];
    }
    for (var e = 0u; e < 8u; e = e + 1u) {
        let i = i0 + e;
        let d = dy_eff(i);
        var dx = k * d;
        if (params.training != 0u) {
            let xhat = (x[i] - mean) * invstd;
            dx = k * (d - (g_dy + xhat * g_dyx) * inv_m);
        }
        if (params.has_divisor != 0u) {
            dx = dx / div;
        }
        y[i] = dx;
    }
}
