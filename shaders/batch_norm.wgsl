// batch_norm.wgsl: BatchNorm2d on NCHW tensors (torch.nn.functional.batch_norm), forward and
// requires: lib/float_bits.wgsl
// requires: lib/activation.wgsl
// backward, matching src/reference/batch_norm.rs (which reduces in f64) to about 1e-6:
//   statistics (training): per channel over N, H, W (M = N*H*W values), mean and
//     var = M2 / M (biased) in one pass that is as sound as two: each thread keeps Welford's
//     running mean and M2 = sum (x - mean)^2 of its values in f32, the threads of a channel
//     combine (count, mean, M2) pairwise (Chan et al.), and so do the partial results of a
//     channel split over several workgroups;
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
//                                   has_divisor (0/1), slope (leaky_relu's negative slope),
//                                   tpc (T, threads per channel segment), fuse (0/1: with
//                                   G = 1, the reduction also writes the elementwise output)
//   @group(0) @binding(1) x:        storage, read array<f32>  input (backward: the forward's input)
//   @group(0) @binding(2) partials: storage, read_write array<f32>  3*C*G (G > 1) partial
//                                   results, see below; with G = 1 the backward reductions
//                                   (backward_reduce, backward_reduce4, backward_thread) write
//                                   grads here (the launcher binds grads: the layout of the
//                                   partials with G = 1 is grads', and a binding fewer keeps
//                                   them within 8 storage buffers per stage); else a dummy
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
//   @group(0) @binding(12) x4:      storage, read array<vec4<f32>>  x as vec4s
//   @group(0) @binding(13) y4:      storage, read_write array<vec4<f32>>  y (dx) as vec4s
//   @group(0) @binding(14) pre4:    storage, read_write array<vec4<f32>>  pre as vec4s
//   @group(0) @binding(15) dy4:     storage, read array<vec4<f32>>  dy as vec4s
//   @group(0) @binding(16) act_x4:  storage, read array<vec4<f32>>  act_x as vec4s
//                                   (12..16: the same buffers as x, y, pre, dy, act_x, for the
//                                   *4 entry points; H*W a multiple of 4, so a vec4 never
//                                   straddles two channels)
//
// Entry points and dispatch (workgroup size WGR = 256, fixed: it sizes workgroup memory).
// The reductions work on channel segments: a workgroup holds WGR / T segments of T threads
// (T = tpc, a power of two <= WGR, chosen per shape by the launcher: 1 for a few values per
// channel, up to WGR for many), segment k of workgroup (g, y, z) is channel
// c = (y + z * num_workgroups.y) * (WGR / T) + k, and its thread t takes the values
// j = g * T + t + i * G * T of that channel (G = groups, workgroups along x splitting one
// channel). Each thread reduces its values serially (Welford's mean and M2 for the statistics,
// plain sums for the backward), then the T threads of a segment combine pairwise (Chan et
// al.'s formula for mean and M2) in workgroup memory.
//   stats_reduce     (0,1,2,3,4,5,6,7): grid (G, By, Bz) over B = ceil(C / (WGR / T)) blocks.
//                                 G = 1: writes the statistics and the running update itself
//                                 and, with fuse = 1, also the normalized output (y, pre) of
//                                 its channel (re-reading its own values); G > 1: writes the
//                                 partial count, mean and M2 of its part of the channel.
//   stats_final      (0,2,3,4,5):   G > 1: 1-D grid over C (flat index gid.x + gid.y *
//                                 num_workgroups.x * WGR), one thread per channel combines the
//                                 G partials in order (Chan), writes statistics and running.
//   backward_reduce  (0,1,2,3,4,6,8,9,11): grid (G, By, Bz): sum dy' and sum dy' * xhat;
//                                 G = 1 (fuse = 1): writes grads (into binding 2) and dx of
//                                 its channel; G > 1: partial sums.
//   backward_final   (0,2,10):    G > 1: 1-D grid over C: sums the G partials into grads.
//   stats_thread, backward_thread: T = 1, G = 1 on scalars: stats_reduce / backward_reduce
//                                 with one invocation per channel (1-D grid over C), no
//                                 workgroup memory and no barrier.
//   eval_stats       (0,3,4,5):   1-D grid over C.
//   normalize        (0,1,3,4,6,7): 1-D grid over n, same tiling.
//   backward_dx      (0,1,3,4,6,8,9,10,11): 1-D grid over n.
//   stats_reduce4, backward_reduce4, normalize4, backward_dx4: the same on vec4s (bindings
//                                 12..16 instead of 1, 6..9), used when H*W is a multiple of 4;
//                                 the reductions count values in vec4s (m / 4 per channel, each
//                                 lane its own Welford / sum, lanes combined at the end), the
//                                 elementwise passes take one vec4 per invocation (1-D grid
//                                 over n / 4). Same arithmetic per element.
// Value j of channel c is element (j / hw) * C * hw + c * hw + j % hw; the reductions step
// through a thread's values keeping (j / hw, j % hw) up to date (no division per value).
// partials (G > 1): statistics: count at c*G + g, mean at C*G + c*G + g, M2 at 2*C*G + c*G + g;
// backward: sum dy' at c*G + g, sum dy' * xhat at C*G + c*G + g.

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
    tpc: u32,
    fuse: u32,
    _pad0: u32,
    _pad1: u32,
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
@group(0) @binding(12) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(13) var<storage, read_write> y4: array<vec4<f32>>;
@group(0) @binding(14) var<storage, read_write> pre4: array<vec4<f32>>;
@group(0) @binding(15) var<storage, read> dy4: array<vec4<f32>>;
@group(0) @binding(16) var<storage, read> act_x4: array<vec4<f32>>;

var<workgroup> sa: array<f32, WGR>;
var<workgroup> sb: array<f32, WGR>;
var<workgroup> sn: array<f32, WGR>;

fn channel_of(i: u32) -> u32 {
    return (i / params.hw) % params.channels;
}

fn flat_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * (nwg.x * WGR);
}

// Where a thread of a channel segment is: its channel (may be >= C in the last block), its
// index t in the segment, the first of its values j0 and the stride between them.
struct Seg {
    c: u32,
    t: u32,
    base: u32,
    j0: u32,
    step: u32,
}

fn segment(wid: vec3<u32>, lid: u32, nwg: vec3<u32>) -> Seg {
    let tpc = params.tpc;
    let per = WGR / tpc;
    let block = wid.y + wid.z * nwg.y;
    let t = lid % tpc;
    return Seg(block * per + lid / tpc, t, lid - t, wid.x * tpc + t, params.groups * tpc);
}

// A walk over values j0, j0 + step, ... < m of channel c: the element index of the current
// value, advanced without division.
struct Walk {
    j: u32,
    q: u32,
    r: u32,
    sq: u32,
    sr: u32,
}

fn walk_start_in(j0: u32, step: u32, hw: u32) -> Walk {
    return Walk(j0, j0 / hw, j0 % hw, step / hw, step % hw);
}

fn walk_index_in(w: Walk, c: u32, hw: u32) -> u32 {
    return (w.q * params.channels + c) * hw + w.r;
}

fn walk_next_in(w: Walk, hw: u32) -> Walk {
    var v = w;
    v.q = w.q + w.sq;
    v.r = w.r + w.sr;
    if (v.r >= hw) {
        v.r = v.r - hw;
        v.q = v.q + 1u;
    }
    return v;
}

fn walk_start(j0: u32, step: u32) -> Walk {
    return walk_start_in(j0, step, params.hw);
}

fn walk_index(w: Walk, c: u32) -> u32 {
    return walk_index_in(w, c, params.hw);
}

fn walk_next(w: Walk, step: u32) -> Walk {
    var v = walk_next_in(w, params.hw);
    v.j = w.j + step;
    return v;
}

// Pairwise combination over the T threads of each segment, the result in slot `base`:
// (count, mean, M2) in (sn, sa, sb) by Chan et al.'s formula.
fn combine_stats(lid: u32, t: u32) {
    workgroupBarrier();
    for (var s = params.tpc / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            let na = sn[lid];
            let nb = sn[lid + s];
            let n = na + nb;
            if (nb > 0.0) {
                let d = sa[lid + s] - sa[lid];
                sa[lid] = sa[lid] + d * (nb / n);
                sb[lid] = sb[lid] + sb[lid + s] + d * d * (na * nb / n);
                sn[lid] = n;
            }
        }
        workgroupBarrier();
    }
}

// Pairwise sums over the T threads of each segment of (sa, sb), the result in slot `base`.
fn combine_sums(lid: u32, t: u32) {
    workgroupBarrier();
    for (var s = params.tpc / 2u; s > 0u; s = s >> 1u) {
        if (t < s) {
            sa[lid] = sa[lid] + sa[lid + s];
            sb[lid] = sb[lid] + sb[lid + s];
        }
        workgroupBarrier();
    }
}

// Statistics and running update of channel c from its mean and M2 over all m values.
fn write_stats(c: u32, mean: f32, m2: f32) {
    let nc = params.channels;
    let var_b = m2 / f32(params.m);
    let unbiased = m2 / f32(params.m - 1u);
    stats[c] = mean;
    stats[nc + c] = 1.0 / sqrt(var_b + params.eps);
    let mom = params.momentum;
    running[c] = (1.0 - mom) * bn[2u * nc + c] + mom * mean;
    running[nc + c] = (1.0 - mom) * bn[3u * nc + c] + mom * unbiased;
}

fn act_forward(v: f32) -> f32 {
    return act_apply(v, params.act, params.slope);
}

fn act_backward(v: f32, d: f32) -> f32 {
    return act_grad(v, d, params.act, params.slope);
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
fn stats_reduce(@builtin(workgroup_id) wid: vec3<u32>,
                @builtin(local_invocation_id) lid3: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let sg = segment(wid, lid, nwg);
    let live = sg.c < params.channels;
    // Welford over this thread's values.
    var cnt = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    if (live) {
        for (var w = walk_start(sg.j0, sg.step); w.j < params.m; w = walk_next(w, sg.step)) {
            let v = x[walk_index(w, sg.c)];
            cnt = cnt + 1.0;
            let d = v - mean;
            mean = mean + d / cnt;
            m2 = m2 + d * (v - mean);
        }
    }
    sn[lid] = cnt;
    sa[lid] = mean;
    sb[lid] = m2;
    combine_stats(lid, sg.t);
    if (!live) {
        return;
    }
    let c = sg.c;
    let nc = params.channels;
    if (params.groups > 1u) {
        if (sg.t == 0u) {
            let cg = nc * params.groups;
            let k = c * params.groups + wid.x;
            partials[k] = sn[lid];
            partials[cg + k] = sa[lid];
            partials[2u * cg + k] = sb[lid];
        }
        return;
    }
    let cmean = sa[sg.base];
    let cm2 = sb[sg.base];
    if (sg.t == 0u) {
        write_stats(c, cmean, cm2);
    }
    if (params.fuse == 0u) {
        return;
    }
    // Normalize this thread's values (as `normalize`).
    let invstd = 1.0 / sqrt(cm2 / f32(params.m) + params.eps);
    let gamma = bn[c];
    let beta = bn[nc + c];
    for (var w = walk_start(sg.j0, sg.step); w.j < params.m; w = walk_next(w, sg.step)) {
        let i = walk_index(w, c);
        let v = (x[i] - cmean) * invstd * gamma + beta;
        if (params.write_pre != 0u) {
            pre[i] = v;
        }
        y[i] = act_forward(v);
    }
}

@compute @workgroup_size(WGR)
fn stats_final(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    if (c >= params.channels) {
        return;
    }
    let g_n = params.groups;
    let cg = params.channels * g_n;
    var n = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var g = 0u; g < g_n; g = g + 1u) {
        let k = c * g_n + g;
        let nb = partials[k];
        if (nb > 0.0) {
            let tot = n + nb;
            let d = partials[cg + k] - mean;
            mean = mean + d * (nb / tot);
            m2 = m2 + partials[2u * cg + k] + d * d * (n * nb / tot);
            n = tot;
        }
    }
    write_stats(c, mean, m2);
}

@compute @workgroup_size(WGR)
fn backward_reduce(@builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(local_invocation_id) lid3: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let sg = segment(wid, lid, nwg);
    let live = sg.c < params.channels;
    let nc = params.channels;
    var acc_dy = 0.0;
    var acc_dyx = 0.0;
    var mean = 0.0;
    var invstd = 0.0;
    if (live) {
        mean = stats[sg.c];
        invstd = stats[nc + sg.c];
        for (var w = walk_start(sg.j0, sg.step); w.j < params.m; w = walk_next(w, sg.step)) {
            let i = walk_index(w, sg.c);
            let d = dy_eff(i);
            acc_dy = acc_dy + d;
            acc_dyx = acc_dyx + d * ((x[i] - mean) * invstd);
        }
    }
    sa[lid] = acc_dy;
    sb[lid] = acc_dyx;
    combine_sums(lid, sg.t);
    if (!live) {
        return;
    }
    let c = sg.c;
    if (params.groups > 1u) {
        if (sg.t == 0u) {
            let k = c * params.groups + wid.x;
            partials[k] = sa[lid];
            partials[nc * params.groups + k] = sb[lid];
        }
        return;
    }
    let g_dy = sa[sg.base];
    let g_dyx = sb[sg.base];
    if (sg.t == 0u) {
        // G = 1: `partials` is the grads buffer (see the header).
        partials[c] = g_dy;
        partials[nc + c] = g_dyx;
    }
    if (params.fuse == 0u) {
        return;
    }
    // dx of this thread's values (as `backward_dx`).
    let k = bn[c] * invstd;
    let inv_m = 1.0 / f32(params.m);
    var div = 1.0;
    if (params.has_divisor != 0u) {
        div = divisor[c];
    }
    for (var w = walk_start(sg.j0, sg.step); w.j < params.m; w = walk_next(w, sg.step)) {
        let i = walk_index(w, c);
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

@compute @workgroup_size(WGR)
fn backward_final(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    let nc = params.channels;
    if (c >= nc) {
        return;
    }
    let g_n = params.groups;
    var acc_dy = 0.0;
    var acc_dyx = 0.0;
    for (var g = 0u; g < g_n; g = g + 1u) {
        acc_dy = acc_dy + partials[c * g_n + g];
        acc_dyx = acc_dyx + partials[nc * g_n + c * g_n + g];
    }
    grads[c] = acc_dy;
    grads[nc + c] = acc_dyx;
}

// T = 1: one invocation per channel, no workgroup memory and no barrier (1-D grid over C).
@compute @workgroup_size(WGR)
fn stats_thread(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    if (c >= params.channels) {
        return;
    }
    let nc = params.channels;
    var cnt = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var w = walk_start(0u, 1u); w.j < params.m; w = walk_next(w, 1u)) {
        let v = x[walk_index(w, c)];
        cnt = cnt + 1.0;
        let d = v - mean;
        mean = mean + d / cnt;
        m2 = m2 + d * (v - mean);
    }
    write_stats(c, mean, m2);
    if (params.fuse == 0u) {
        return;
    }
    let invstd = 1.0 / sqrt(m2 / f32(params.m) + params.eps);
    let gamma = bn[c];
    let beta = bn[nc + c];
    for (var w = walk_start(0u, 1u); w.j < params.m; w = walk_next(w, 1u)) {
        let i = walk_index(w, c);
        let v = (x[i] - mean) * invstd * gamma + beta;
        if (params.write_pre != 0u) {
            pre[i] = v;
        }
        y[i] = act_forward(v);
    }
}

@compute @workgroup_size(WGR)
fn backward_thread(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    let nc = params.channels;
    if (c >= nc) {
        return;
    }
    let mean = stats[c];
    let invstd = stats[nc + c];
    var g_dy = 0.0;
    var g_dyx = 0.0;
    for (var w = walk_start(0u, 1u); w.j < params.m; w = walk_next(w, 1u)) {
        let i = walk_index(w, c);
        let d = dy_eff(i);
        g_dy = g_dy + d;
        g_dyx = g_dyx + d * ((x[i] - mean) * invstd);
    }
    // G = 1: `partials` is the grads buffer (see the header).
    partials[c] = g_dy;
    partials[nc + c] = g_dyx;
    let k = bn[c] * invstd;
    let inv_m = 1.0 / f32(params.m);
    var div = 1.0;
    if (params.has_divisor != 0u) {
        div = divisor[c];
    }
    for (var w = walk_start(0u, 1u); w.j < params.m; w = walk_next(w, 1u)) {
        let i = walk_index(w, c);
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

// --- vec4 forms (H*W a multiple of 4), values counted in vec4s: hw4 = hw / 4, m4 = m / 4.

fn act_forward4(v: vec4<f32>) -> vec4<f32> {
    return vec4<f32>(act_forward(v.x), act_forward(v.y), act_forward(v.z), act_forward(v.w));
}

fn dy_eff4(i: u32) -> vec4<f32> {
    let d = dy4[i];
    if (params.act == 0u) {
        return d;
    }
    let a = act_x4[i];
    return vec4<f32>(act_backward(a.x, d.x), act_backward(a.y, d.y), act_backward(a.z, d.z),
                     act_backward(a.w, d.w));
}

@compute @workgroup_size(WGR)
fn stats_reduce4(@builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(local_invocation_id) lid3: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let sg = segment(wid, lid, nwg);
    let live = sg.c < params.channels;
    let hw4 = params.hw / 4u;
    let m4 = params.m / 4u;
    // Welford per lane over this thread's vec4s, then the four lanes combined (equal counts).
    var cnt = 0.0;
    var mean = vec4<f32>(0.0);
    var m2 = vec4<f32>(0.0);
    if (live) {
        var w = walk_start_in(sg.j0, sg.step, hw4);
        for (var j = sg.j0; j < m4; j = j + sg.step) {
            let v = x4[walk_index_in(w, sg.c, hw4)];
            cnt = cnt + 1.0;
            let d = v - mean;
            mean = mean + d / cnt;
            m2 = m2 + d * (v - mean);
            w = walk_next_in(w, hw4);
        }
    }
    let d01 = mean.y - mean.x;
    let d23 = mean.w - mean.z;
    let mean01 = mean.x + 0.5 * d01;
    let mean23 = mean.z + 0.5 * d23;
    let m2_01 = m2.x + m2.y + d01 * d01 * (0.5 * cnt);
    let m2_23 = m2.z + m2.w + d23 * d23 * (0.5 * cnt);
    let dq = mean23 - mean01;
    sn[lid] = 4.0 * cnt;
    sa[lid] = mean01 + 0.5 * dq;
    sb[lid] = m2_01 + m2_23 + dq * dq * cnt;
    combine_stats(lid, sg.t);
    if (!live) {
        return;
    }
    let c = sg.c;
    let nc = params.channels;
    if (params.groups > 1u) {
        if (sg.t == 0u) {
            let cg = nc * params.groups;
            let k = c * params.groups + wid.x;
            partials[k] = sn[lid];
            partials[cg + k] = sa[lid];
            partials[2u * cg + k] = sb[lid];
        }
        return;
    }
    let cmean = sa[sg.base];
    let cm2 = sb[sg.base];
    if (sg.t == 0u) {
        write_stats(c, cmean, cm2);
    }
    if (params.fuse == 0u) {
        return;
    }
    let invstd = 1.0 / sqrt(cm2 / f32(params.m) + params.eps);
    let gamma = bn[c];
    let beta = bn[nc + c];
    var w = walk_start_in(sg.j0, sg.step, hw4);
    for (var j = sg.j0; j < m4; j = j + sg.step) {
        let i = walk_index_in(w, c, hw4);
        let v = (x4[i] - cmean) * invstd * gamma + beta;
        if (params.write_pre != 0u) {
            pre4[i] = v;
        }
        y4[i] = act_forward4(v);
        w = walk_next_in(w, hw4);
    }
}

@compute @workgroup_size(WGR)
fn backward_reduce4(@builtin(workgroup_id) wid: vec3<u32>,
                    @builtin(local_invocation_id) lid3: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let lid = lid3.x;
    let sg = segment(wid, lid, nwg);
    let live = sg.c < params.channels;
    let nc = params.channels;
    let hw4 = params.hw / 4u;
    let m4 = params.m / 4u;
    var acc_dy = vec4<f32>(0.0);
    var acc_dyx = vec4<f32>(0.0);
    var mean = 0.0;
    var invstd = 0.0;
    if (live) {
        mean = stats[sg.c];
        invstd = stats[nc + sg.c];
        var w = walk_start_in(sg.j0, sg.step, hw4);
        for (var j = sg.j0; j < m4; j = j + sg.step) {
            let i = walk_index_in(w, sg.c, hw4);
            let d = dy_eff4(i);
            acc_dy = acc_dy + d;
            acc_dyx = acc_dyx + d * ((x4[i] - mean) * invstd);
            w = walk_next_in(w, hw4);
        }
    }
    sa[lid] = (acc_dy.x + acc_dy.y) + (acc_dy.z + acc_dy.w);
    sb[lid] = (acc_dyx.x + acc_dyx.y) + (acc_dyx.z + acc_dyx.w);
    combine_sums(lid, sg.t);
    if (!live) {
        return;
    }
    let c = sg.c;
    if (params.groups > 1u) {
        if (sg.t == 0u) {
            let k = c * params.groups + wid.x;
            partials[k] = sa[lid];
            partials[nc * params.groups + k] = sb[lid];
        }
        return;
    }
    let g_dy = sa[sg.base];
    let g_dyx = sb[sg.base];
    if (sg.t == 0u) {
        // G = 1: `partials` is the grads buffer (see the header).
        partials[c] = g_dy;
        partials[nc + c] = g_dyx;
    }
    if (params.fuse == 0u) {
        return;
    }
    let k = bn[c] * invstd;
    let inv_m = 1.0 / f32(params.m);
    var div = 1.0;
    if (params.has_divisor != 0u) {
        div = divisor[c];
    }
    var w = walk_start_in(sg.j0, sg.step, hw4);
    for (var j = sg.j0; j < m4; j = j + sg.step) {
        let i = walk_index_in(w, c, hw4);
        let d = dy_eff4(i);
        var dx = k * d;
        if (params.training != 0u) {
            let xhat = (x4[i] - mean) * invstd;
            dx = k * (d - (g_dy + xhat * g_dyx) * inv_m);
        }
        if (params.has_divisor != 0u) {
            dx = dx / div;
        }
        y4[i] = dx;
        w = walk_next_in(w, hw4);
    }
}

@compute @workgroup_size(WGR)
fn normalize4(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let i4 = flat_index(gid, nwg);
    if (i4 >= params.n / 4u) {
        return;
    }
    let c = channel_of(i4 * 4u);
    let nc = params.channels;
    let v = (x4[i4] - stats[c]) * stats[nc + c] * bn[c] + bn[nc + c];
    if (params.write_pre != 0u) {
        pre4[i4] = v;
    }
    y4[i4] = act_forward4(v);
}

@compute @workgroup_size(WGR)
fn backward_dx4(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let i4 = flat_index(gid, nwg);
    if (i4 >= params.n / 4u) {
        return;
    }
    let c = channel_of(i4 * 4u);
    let nc = params.channels;
    let invstd = stats[nc + c];
    let k = bn[c] * invstd;
    let d = dy_eff4(i4);
    var dx = k * d;
    if (params.training != 0u) {
        let xhat = (x4[i4] - stats[c]) * invstd;
        let inv_m = 1.0 / f32(params.m);
        dx = k * (d - (grads[c] + xhat * grads[nc + c]) * inv_m);
    }
    if (params.has_divisor != 0u) {
        dx = dx / divisor[c];
    }
    y4[i4] = dx;
}
