// batch_norm.wgsl: BatchNorm2d on NCHW tensors (torch.nn.functional.batch_norm), forward and
// requires: lib/float_bits.wgsl
// requires: lib/activation.wgsl
// requires: lib/partial_run.wgsl
// backward, matching src/reference/batch_norm.rs (which reduces in f64) to about 1e-6:
//   statistics (training): per channel over N, H, W (M = N*H*W values), mean and
//     var = M2 / M (biased) in one pass that is as sound as two: each invocation keeps
//     Welford's running mean and M2 = sum (x - mean)^2 of its values in f32, and the partial
//     results of a channel are combined in order by Chan et al.'s formula;
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
// No entry point uses workgroup memory or barriers: the reductions are per invocation, then
// per channel (a workgroup-wide tree costs far more than the loads on CPU adapters, where each
// barrier switches every invocation of the workgroup, and a two-level reduction is as good on
// GPUs for these sizes).
//
// Bindings (group 0):
//   @group(0) @binding(0) params:   uniform Params  n (elements N*C*H*W), channels (C), hw (H*W),
//                                   m (values per channel N*H*W), groups (P, partial
//                                   invocations per channel), act (0..4), write_pre (0/1),
//                                   training (backward_dx: 0 eval form, 1 training form), eps,
//                                   momentum, has_divisor (0/1), slope (leaky_relu's negative
//                                   slope), fuse (0/1: the per-channel invocation of
//                                   stats_thread / backward_thread also writes the elementwise
//                                   output)
//   @group(0) @binding(1) x:        storage, read array<f32>  input (backward: the forward's input)
//   @group(0) @binding(2) partials: storage, read_write array<f32>  3*C*P (statistics) or 2*C*P
//                                   (backward) partial results, see below; backward_thread
//                                   writes grads here (the launcher binds grads: a binding
//                                   fewer keeps it within 8 storage buffers per stage)
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
// Entry points and dispatch (workgroup size WGR = 256). Grids are 1-D, tiled over x and y
// (flat index gid.x + gid.y * num_workgroups.x * WGR); a plane grid is the 1-D grid over the
// N*C planes x R = ceil(len / PLANE_ITEMS) runs per plane (len: H*W values or vec4s):
// invocation t takes the contiguous run of PLANE_ITEMS values from (t % R) * PLANE_ITEMS of
// plane t / R (channel (t / R) % C), its channel's coefficients loaded once.
//   stats_partial    (0,1,2):      1-D grid over C*P: invocation t reduces channel t / P,
//                                 its run of values (below; Welford), writes its partial.
//   backward_partial (0,1,2,4,8,9): 1-D grid over C*P: sum dy' and sum dy' * xhat likewise.
//   stats_final      (0,2,3,4,5):   1-D grid over C: combines the P partials of a channel in
//                                 order (Chan), writes statistics and running.
//   backward_final   (0,2,10):    1-D grid over C: sums the P partials into grads.
//   stats_thread, backward_thread: P = 1 on scalars: one invocation per channel (1-D grid
//                                 over C) reduces it, writes statistics (grads) and, with
//                                 fuse = 1, the elementwise output of the channel.
//   eval_stats       (0,3,4,5):   1-D grid over C.
//   normalize        (0,1,3,4,6,7): 1-D grid over n (few values per plane: the channel of
//                                 each element by division);
//   normalize_plane  (same):      plane grid (many values per plane: one division per
//                                 invocation, none per element).
//   backward_dx, backward_dx_plane (0,1,3,4,6,8,9,10,11): likewise.
//   stats_partial4, backward_partial4, normalize4, normalize_plane4, backward_dx4,
//   backward_dx_plane4: the same on vec4s (bindings 12..16 instead of 1, 6..9), used when H*W
//                                 is a multiple of 4; values are counted in vec4s (m / 4 per
//                                 channel, hw / 4 per plane; each lane its own Welford / sum,
//                                 lanes combined at the end). Same arithmetic per element.
// Value j of channel c is element (j / hw) * C * hw + c * hw + j % hw; partial g of a channel
// reduces the contiguous run of values g * L <= j < (g + 1) * L (L = ceil(m / P)), keeping
// (j / hw, j % hw) up to date (no division per value). (Contiguous runs: each SIMD lane of a
// CPU adapter streams its own run, 3-4x faster on lavapipe than an interleaved walk; on GPUs
// an interleaved walk would coalesce better.)
// partials: statistics: count at c*P + g, mean at C*P + c*P + g, M2 at 2*C*P + c*P + g;
// backward: sum dy' at c*P + g, sum dy' * xhat at C*P + c*P + g.

const WGR: u32 = 256u;
// Consecutive values (or vec4s) an invocation of a plane grid's elementwise pass takes.
const PLANE_ITEMS: u32 = 16u;

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
    _pad2: u32,
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

fn channel_of(i: u32) -> u32 {
    return (i / params.hw) % params.channels;
}

fn flat_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * (nwg.x * WGR);
}


// A walk over consecutive values j0, j0 + 1, ... of channel c (hw values per plane): the
// element index of the current value, advanced without division.
struct Walk {
    j: u32,
    q: u32,
    r: u32,
}

fn walk_start(j0: u32, hw: u32) -> Walk {
    return Walk(j0, j0 / hw, j0 % hw);
}

fn walk_index(w: Walk, c: u32, hw: u32) -> u32 {
    return (w.q * params.channels + c) * hw + w.r;
}

fn walk_next(w: Walk, hw: u32) -> Walk {
    var v = Walk(w.j + 1u, w.q, w.r + 1u);
    if (v.r >= hw) {
        v.r = 0u;
        v.q = v.q + 1u;
    }
    return v;
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

// The partial statistics (count, mean, M2) of invocation g of channel c.
fn write_stats_partial(c: u32, g: u32, cnt: f32, mean: f32, m2: f32) {
    let slot = stats_slot(c, g, params.channels, params.groups);
    partials[slot.x] = cnt;
    partials[slot.y] = mean;
    partials[slot.z] = m2;
}

// The partial sums (sum dy', sum dy' * xhat) of invocation g of channel c.
fn write_sums_partial(c: u32, g: u32, s_dy: f32, s_dyx: f32) {
    let k = c * params.groups + g;
    partials[k] = s_dy;
    partials[params.channels * params.groups + k] = s_dyx;
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

// What normalizes channel c: mean, invstd, gamma, beta.
struct NormCoef {
    mean: f32,
    invstd: f32,
    gamma: f32,
    beta: f32,
}

fn norm_coef(c: u32) -> NormCoef {
    let nc = params.channels;
    return NormCoef(stats[c], stats[nc + c], bn[c], bn[nc + c]);
}

// Normalize element i with its channel's coefficients (pre and y).
fn normalize_at(i: u32, k: NormCoef) {
    let v = (x[i] - k.mean) * k.invstd * k.gamma + k.beta;
    if (params.write_pre != 0u) {
        pre[i] = v;
    }
    y[i] = act_forward(v);
}

// The values of a plane grid's invocation: its plane's elements base + r, first <= r < end
// (at most PLANE_ITEMS consecutive ones); live false past the last plane (grid padding).
struct PlaneRun {
    live: bool,
    channel: u32,
    base: u32,
    first: u32,
    end: u32,
}

fn plane_run(gid: vec3<u32>, nwg: vec3<u32>, len: u32) -> PlaneRun {
    let t = flat_index(gid, nwg);
    let runs = (len + PLANE_ITEMS - 1u) / PLANE_ITEMS;
    let plane = t / runs;
    let first = (t % runs) * PLANE_ITEMS;
    return PlaneRun(plane < params.n / params.hw, plane % params.channels, plane * len, first,
                    min(len, first + PLANE_ITEMS));
}

@compute @workgroup_size(WGR)
fn normalize(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    normalize_at(i, norm_coef(channel_of(i)));
}

@compute @workgroup_size(WGR)
fn normalize_plane(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let run = plane_run(gid, nwg, params.hw);
    if (!run.live) {
        return;
    }
    let k = norm_coef(run.channel);
    for (var j = 0u; j < PLANE_ITEMS; j = j + 1u) {
        let r = run.first + j;
        if (r < run.end) {
            normalize_at(run.base + r, k);
        }
    }
}

// dy after the activation's backward.
fn dy_eff(i: u32) -> f32 {
    let d = dy[i];
    if (params.act == 0u) {
        return d;
    }
    return act_backward(act_x[i], d);
}

// What gives dx in channel c: mean, invstd, k = gamma * invstd, the sums g_dy and g_dyx, the
// divisor (1 without one).
struct DxCoef {
    mean: f32,
    invstd: f32,
    k: f32,
    g_dy: f32,
    g_dyx: f32,
    div: f32,
}

fn dx_coef(c: u32, g_dy: f32, g_dyx: f32) -> DxCoef {
    let invstd = stats[params.channels + c];
    var div = 1.0;
    if (params.has_divisor != 0u) {
        div = divisor[c];
    }
    return DxCoef(stats[c], invstd, bn[c] * invstd, g_dy, g_dyx, div);
}

fn dx_from(d: f32, xv: f32, k: DxCoef) -> f32 {
    var dx = k.k * d;
    if (params.training != 0u) {
        let xhat = (xv - k.mean) * k.invstd;
        let inv_m = 1.0 / f32(params.m);
        dx = k.k * (d - (k.g_dy + xhat * k.g_dyx) * inv_m);
    }
    if (params.has_divisor != 0u) {
        dx = dx / k.div;
    }
    return dx;
}

fn dx_value(i: u32, k: DxCoef) -> f32 {
    return dx_from(dy_eff(i), x[i], k);
}

@compute @workgroup_size(WGR)
fn backward_dx(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    let c = channel_of(i);
    y[i] = dx_value(i, dx_coef(c, grads[c], grads[params.channels + c]));
}

@compute @workgroup_size(WGR)
fn backward_dx_plane(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let run = plane_run(gid, nwg, params.hw);
    if (!run.live) {
        return;
    }
    let c = run.channel;
    let k = dx_coef(c, grads[c], grads[params.channels + c]);
    for (var j = 0u; j < PLANE_ITEMS; j = j + 1u) {
        let r = run.first + j;
        if (r < run.end) {
            y[run.base + r] = dx_value(run.base + r, k);
        }
    }
}

@compute @workgroup_size(WGR)
fn stats_partial(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    let c = t / params.groups;
    if (c >= params.channels) {
        return;
    }
    let g = t % params.groups;
    var cnt = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    let run = partial_run(g, params.m, params.groups);
    // Welford on the values less the run's first (a large mean costs no precision).
    var shift = 0.0;
    if (run.x < run.y) {
        shift = x[walk_index(walk_start(run.x, params.hw), c, params.hw)];
    }
    for (var w = walk_start(run.x, params.hw); w.j < run.y; w = walk_next(w, params.hw)) {
        let v = x[walk_index(w, c, params.hw)] - shift;
        cnt = cnt + 1.0;
        let d = v - mean;
        mean = mean + d / cnt;
        m2 = m2 + d * (v - mean);
    }
    write_stats_partial(c, g, cnt, shift + mean, m2);
}

@compute @workgroup_size(WGR)
fn stats_final(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    if (c >= params.channels) {
        return;
    }
    let g_n = params.groups;
    // Chan's combination of the partial means less the first's (a large mean costs no
    // precision over many partials).
    let shift = partials[stats_slot(c, 0u, params.channels, g_n).y];
    var n = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var g = 0u; g < g_n; g = g + 1u) {
        let slot = stats_slot(c, g, params.channels, g_n);
        let nb = partials[slot.x];
        if (nb > 0.0) {
            let tot = n + nb;
            let d = (partials[slot.y] - shift) - mean;
            mean = mean + d * (nb / tot);
            m2 = m2 + partials[slot.z] + d * d * (n * nb / tot);
            n = tot;
        }
    }
    write_stats(c, shift + mean, m2);
}

@compute @workgroup_size(WGR)
fn backward_partial(@builtin(global_invocation_id) gid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    let c = t / params.groups;
    if (c >= params.channels) {
        return;
    }
    let g = t % params.groups;
    let mean = stats[c];
    let invstd = stats[params.channels + c];
    var acc_dy = 0.0;
    var acc_dyx = 0.0;
    let run = partial_run(g, params.m, params.groups);
    for (var w = walk_start(run.x, params.hw); w.j < run.y; w = walk_next(w, params.hw)) {
        let i = walk_index(w, c, params.hw);
        let d = dy_eff(i);
        acc_dy = acc_dy + d;
        acc_dyx = acc_dyx + d * ((x[i] - mean) * invstd);
    }
    write_sums_partial(c, g, acc_dy, acc_dyx);
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

// P = 1: one invocation per channel reduces it and (fuse = 1) writes its elementwise output.
@compute @workgroup_size(WGR)
fn stats_thread(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    if (c >= params.channels) {
        return;
    }
    let nc = params.channels;
    let hw = params.hw;
    var cnt = 0.0;
    var mean = 0.0;
    var m2 = 0.0;
    for (var w = walk_start(0u, hw); w.j < params.m; w = walk_next(w, hw)) {
        let v = x[walk_index(w, c, hw)];
        cnt = cnt + 1.0;
        let d = v - mean;
        mean = mean + d / cnt;
        m2 = m2 + d * (v - mean);
    }
    write_stats(c, mean, m2);
    if (params.fuse == 0u) {
        return;
    }
    let k = NormCoef(mean, 1.0 / sqrt(m2 / f32(params.m) + params.eps), bn[c], bn[nc + c]);
    for (var w = walk_start(0u, hw); w.j < params.m; w = walk_next(w, hw)) {
        normalize_at(walk_index(w, c, hw), k);
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
    let hw = params.hw;
    let mean = stats[c];
    let invstd = stats[nc + c];
    var g_dy = 0.0;
    var g_dyx = 0.0;
    for (var w = walk_start(0u, hw); w.j < params.m; w = walk_next(w, hw)) {
        let i = walk_index(w, c, hw);
        let d = dy_eff(i);
        g_dy = g_dy + d;
        g_dyx = g_dyx + d * ((x[i] - mean) * invstd);
    }
    // `partials` is the grads buffer here (see the header).
    partials[c] = g_dy;
    partials[nc + c] = g_dyx;
    if (params.fuse == 0u) {
        return;
    }
    let k = dx_coef(c, g_dy, g_dyx);
    for (var w = walk_start(0u, hw); w.j < params.m; w = walk_next(w, hw)) {
        let i = walk_index(w, c, hw);
        y[i] = dx_value(i, k);
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
fn stats_partial4(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    let c = t / params.groups;
    if (c >= params.channels) {
        return;
    }
    let g = t % params.groups;
    let hw4 = params.hw / 4u;
    let m4 = params.m / 4u;
    // Welford per lane over this invocation's vec4s, then the four lanes combined (equal
    // counts).
    var wf = welford4_new();
    let run = partial_run(g, m4, params.groups);
    // Welford on the values less the run's first vec4 (a large mean costs no precision).
    var shift = vec4<f32>(0.0);
    if (run.x < run.y) {
        shift = x4[walk_index(walk_start(run.x, hw4), c, hw4)];
    }
    for (var w = walk_start(run.x, hw4); w.j < run.y; w = walk_next(w, hw4)) {
        welford4_add(&wf, x4[walk_index(w, c, hw4)] - shift);
    }
    let tot = welford4_total(wf, shift);
    write_stats_partial(c, g, tot.x, tot.y, tot.z);
}

@compute @workgroup_size(WGR)
fn backward_partial4(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    let c = t / params.groups;
    if (c >= params.channels) {
        return;
    }
    let g = t % params.groups;
    let hw4 = params.hw / 4u;
    let m4 = params.m / 4u;
    let mean = stats[c];
    let invstd = stats[params.channels + c];
    var acc_dy = vec4<f32>(0.0);
    var acc_dyx = vec4<f32>(0.0);
    let run = partial_run(g, m4, params.groups);
    for (var w = walk_start(run.x, hw4); w.j < run.y; w = walk_next(w, hw4)) {
        let i = walk_index(w, c, hw4);
        let d = dy_eff4(i);
        acc_dy = acc_dy + d;
        acc_dyx = acc_dyx + d * ((x4[i] - mean) * invstd);
    }
    write_sums_partial(c, g, (acc_dy.x + acc_dy.y) + (acc_dy.z + acc_dy.w),
                       (acc_dyx.x + acc_dyx.y) + (acc_dyx.z + acc_dyx.w));
}

// Normalize vec4 i4 with its channel's coefficients.
fn normalize4_at(i4: u32, k: NormCoef) {
    let v = (x4[i4] - k.mean) * k.invstd * k.gamma + k.beta;
    if (params.write_pre != 0u) {
        pre4[i4] = v;
    }
    y4[i4] = act_forward4(v);
}

@compute @workgroup_size(WGR)
fn normalize4(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let i4 = flat_index(gid, nwg);
    if (i4 >= params.n / 4u) {
        return;
    }
    normalize4_at(i4, norm_coef(channel_of(i4 * 4u)));
}

@compute @workgroup_size(WGR)
fn normalize_plane4(@builtin(global_invocation_id) gid: vec3<u32>,
                    @builtin(num_workgroups) nwg: vec3<u32>) {
    let run = plane_run(gid, nwg, params.hw / 4u);
    if (!run.live) {
        return;
    }
    let k = norm_coef(run.channel);
    for (var j = 0u; j < PLANE_ITEMS; j = j + 1u) {
        let r = run.first + j;
        if (r < run.end) {
            normalize4_at(run.base + r, k);
        }
    }
}

// dx of vec4 i4 with its channel's coefficients (as dx_from, per lane).
fn dx4_at(i4: u32, k: DxCoef) {
    let d = dy_eff4(i4);
    var dx = k.k * d;
    if (params.training != 0u) {
        let xhat = (x4[i4] - k.mean) * k.invstd;
        let inv_m = 1.0 / f32(params.m);
        dx = k.k * (d - (k.g_dy + xhat * k.g_dyx) * inv_m);
    }
    if (params.has_divisor != 0u) {
        dx = dx / k.div;
    }
    y4[i4] = dx;
}

fn grads_coef(c: u32) -> DxCoef {
    return dx_coef(c, grads[c], grads[params.channels + c]);
}

@compute @workgroup_size(WGR)
fn backward_dx4(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let i4 = flat_index(gid, nwg);
    if (i4 >= params.n / 4u) {
        return;
    }
    dx4_at(i4, grads_coef(channel_of(i4 * 4u)));
}

@compute @workgroup_size(WGR)
fn backward_dx_plane4(@builtin(global_invocation_id) gid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let run = plane_run(gid, nwg, params.hw / 4u);
    if (!run.live) {
        return;
    }
    let k = grads_coef(run.channel);
    for (var j = 0u; j < PLANE_ITEMS; j = j + 1u) {
        let r = run.first + j;
        if (r < run.end) {
            dx4_at(run.base + r, k);
        }
    }
}
