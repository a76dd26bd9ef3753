// conv_bn.wgsl: the QAT-specific kernels of ConvBn2d / ConvBnReLU2d (torch.ao.nn.intrinsic.qat,
// requires: lib/float_bits.wgsl
// requires: lib/exact_float.wgsl (nmin, nmax, div_rn, sqrt_rn)
// requires: lib/partial_run.wgsl
// _forward_approximate), forward and backward, matching src/reference/conv_bn.rs:
//   scale_weight:  per output channel o, s = gamma / sqrt(running_var + eps) (with
//                  finite_zero = 1, s = 1 where gamma is +-0: the finite gamma = 0 form of
//                  reference::conv_bn::qat_scale_factor_finite) and
//                  1/s, W_s = W * s[o], and the min / max of W_s (the weight observer's
//                  reduction). sqrt and / are correctly rounded here (sqrt_rn, div_rn in
//                  integer arithmetic; WGSL's are not), so s, W_s and everything the weight fake
//                  quant derives from them are bit-exact with the CPU: one ulp of s moves a
//                  weight that sits on a rounding tie to the other quantization level.
//   minmax_merge:  per-channel min / max -> per-tensor min / max.
//   scale_factor:  s and 1/s only (the unfused chain).
//   channel_op:    elementwise with per-channel vectors a, b: op 0 x / a[c], 1 x + a[c],
//                  2 x * a[c], 3 (x - b[c]) * a[c], 4 the constant 1 (a mask of ones).
//   divide_back_partial / divide_back_final: the backward's divide-back terms from
//                  g = d conv_out (= dBN_in / s): conv bias grad = s * sum g, and
//                  d gamma = d gamma_BN + (-sum g * (bn_in - b)) / sqrt(running_var + eps)
//                  (sum dBN_in * conv_out / s^2 = sum g * (bn_in - b)), d beta = d beta_BN.
//   weight_grad:   dW_s = dW_q * mask, dW = dW_s * s[o], d gamma[o] += (sum dW_s * W) / sqrt(rv + eps).
//                  Both leave d gamma = d gamma_BN in a channel run in the finite gamma = 0
//                  form (gamma +-0 and saved s != 0: s does not depend on gamma there), as
//                  reference::conv_bn::conv_bn_qat_backward.
//   eval_scale:    the fused eval forward's epilogue without a folded weight: per output
//                  channel r = 1 / sqrt(running_var + eps), s = gamma * r and
//                  b' = (b - running_mean) * r * gamma + beta (the folded bias, as fold.wgsl's
//                  fold_scale); the conv then computes act(acc * s + b') from the unfolded W.
//   sqrt_rn_test:  exposes sqrt_rn for testing.
// NaN never becomes a number: min / max propagate NaN like observer.wgsl.
//
// Bindings (group 0):
//   @group(0) @binding(0) params:    uniform Params  n (elements), channels (C = output
//                                    channels), inner (elements per channel-slice: weight
//                                    elements per output channel; channel_op: product of the
//                                    dims after the channel axis), m (values per channel
//                                    N*H*W), groups (G, partial invocations per channel), op
//                                    (channel_op), hw (H*W), finite_zero (1: s = 1 where
//                                    gamma = 0), eps
//   @group(0) @binding(1) bn:        storage, read array<f32>  4*C: gamma, beta, running_mean, running_var
//   @group(0) @binding(2) w:         storage, read array<f32>  conv weight [O, I, KH, KW]
//   @group(0) @binding(3) w_s:       storage, read_write array<f32>  scaled weight W * s[o]
//   @group(0) @binding(4) s:         storage, read_write array<f32>  C scale factors s
//   @group(0) @binding(5) inv_s:     storage, read_write array<f32>  C values 1/s
//   @group(0) @binding(6) minmax:    storage, read_write array<f32>  2*C: min[C], max[C] of W_s
//   @group(0) @binding(7) minmax_t:  storage, read_write array<f32>  2: per-tensor min, max
//   @group(0) @binding(8) x:         storage, read array<f32>  channel_op / sqrt_rn_test input;
//                                    divide_back_partial: g = d conv_out
//   @group(0) @binding(9) a:         storage, read array<f32>  channel_op: C values
//   @group(0) @binding(10) b:        storage, read array<f32>  channel_op: C values;
//                                    divide_back_partial: conv bias (zeros if none)
//   @group(0) @binding(11) out:      storage, read_write array<f32>  channel_op / sqrt_rn_test output
//   @group(0) @binding(12) bn_in:    storage, read array<f32>  BatchNorm input conv_out / s + b
//   @group(0) @binding(13) partials: storage, read_write array<f32>  2*C*G: sum g at c*G + g,
//                                    sum g * (bn_in - b) at C*G + c*G + g
//   @group(0) @binding(14) bn_grads: storage, read array<f32>  2*C: d beta, d gamma of the BatchNorm
//   @group(0) @binding(15) dbias:    storage, read_write array<f32>  C: conv bias gradient
//   @group(0) @binding(16) dgamma:   storage, read_write array<f32>  C: bn.weight gradient
//   @group(0) @binding(17) dbeta:    storage, read_write array<f32>  C: bn.bias gradient
//   @group(0) @binding(18) dw_q:     storage, read array<f32>  conv weight gradient w.r.t. W_q
//   @group(0) @binding(19) mask:     storage, read array<f32>  fake-quant mask of W_s
//   @group(0) @binding(20) dw:       storage, read_write array<f32>  conv weight gradient
//   @group(0) @binding(21) w4:       storage, read array<vec4<f32>>  w as vec4s
//   @group(0) @binding(22) w_s4:     storage, read_write array<vec4<f32>>  w_s as vec4s
//   @group(0) @binding(23) dw_q4:    storage, read array<vec4<f32>>  dw_q as vec4s
//   @group(0) @binding(24) mask4:    storage, read array<vec4<f32>>  mask as vec4s
//   @group(0) @binding(25) dw4:      storage, read_write array<vec4<f32>>  dw as vec4s
//                                    (21, 22: the same buffers as 2, 3, for
//                                    scale_weight_partial4: weights per channel a multiple
//                                    of 4, so a vec4 stays in one channel)
//
// Entry points and dispatch (workgroup size WGR = 256):
//   scale_weight_partial (0,1,2,3,13):    1-D grid over C*G, no barrier: invocation t scales
//                                         a contiguous run of channel t / G's weights into
//                                         W_s and writes their min at c*G + g and max at
//                                         C*G + c*G + g of partials;
//   scale_weight_partial4 (0,1,13,21,22): the same on vec4s (inner a multiple of 4; runs
//                                         counted in vec4s).
//   scale_weight_final  (0,1,4,5,6,13):   1-D grid over C: s, 1/s and the channel's min/max
//                                         from its G partials.
//   minmax_merge        (0,6,7):          grid (1, 1, 1).
//   scale_factor        (0,1,4,5):        1-D grid over C (flat index gid.x + gid.y * num_workgroups.x * WGR).
//   channel_op          (0,8,9,10,11):    1-D grid over n, same tiling; channel of element i:
//                                         (i / inner) % C.
//   divide_back_partial (0,8,10,12,13):   1-D grid over C*G, no barrier: invocation t sums a
//                                         contiguous run of channel t / G's values (value j
//                                         of channel c is element (j / hw) * C * hw + c * hw
//                                         + j % hw).
//   divide_back_final   (0,1,4,13,14,15,16,17): 1-D grid over C, one invocation per channel.
//   weight_grad_partial (0,2,4,13,18,19,20): 1-D grid over C*G: invocation t writes dW over a
//                                         contiguous run of channel t / G's weights and its
//                                         sum dW_s * W at c*G + g of partials;
//   weight_grad_final   (0,1,4,13,16):    1-D grid over C: adds the channel's G partials
//                                         / sqrt(rv + eps) to d gamma.
//   eval_scale          (0,1,4,10,11):    1-D grid over C; b = conv bias (zeros if none), out = b'.
//   sqrt_rn_test        (0,8,11):         1-D grid over n.

const WGR: u32 = 256u;

struct Params {
    n: u32,
    channels: u32,
    inner: u32,
    m: u32,
    groups: u32,
    op: u32,
    hw: u32,
    finite_zero: u32,
    eps: f32,
    _pad1: u32,
    _pad2: u32,
    _pad3: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> bn: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read_write> w_s: array<f32>;
@group(0) @binding(4) var<storage, read_write> s: array<f32>;
@group(0) @binding(5) var<storage, read_write> inv_s: array<f32>;
@group(0) @binding(6) var<storage, read_write> minmax: array<f32>;
@group(0) @binding(7) var<storage, read_write> minmax_t: array<f32>;
@group(0) @binding(8) var<storage, read> x: array<f32>;
@group(0) @binding(9) var<storage, read> a: array<f32>;
@group(0) @binding(10) var<storage, read> b: array<f32>;
@group(0) @binding(11) var<storage, read_write> out: array<f32>;
@group(0) @binding(12) var<storage, read> bn_in: array<f32>;
@group(0) @binding(13) var<storage, read_write> partials: array<f32>;
@group(0) @binding(14) var<storage, read> bn_grads: array<f32>;
@group(0) @binding(15) var<storage, read_write> dbias: array<f32>;
@group(0) @binding(16) var<storage, read_write> dgamma: array<f32>;
@group(0) @binding(17) var<storage, read_write> dbeta: array<f32>;
@group(0) @binding(18) var<storage, read> dw_q: array<f32>;
@group(0) @binding(19) var<storage, read> mask: array<f32>;
@group(0) @binding(20) var<storage, read_write> dw: array<f32>;
@group(0) @binding(21) var<storage, read> w4: array<vec4<f32>>;
@group(0) @binding(22) var<storage, read_write> w_s4: array<vec4<f32>>;
@group(0) @binding(23) var<storage, read> dw_q4: array<vec4<f32>>;
@group(0) @binding(24) var<storage, read> mask4: array<vec4<f32>>;
@group(0) @binding(25) var<storage, read_write> dw4: array<vec4<f32>>;

var<workgroup> sa: array<f32, WGR>;
var<workgroup> sb: array<f32, WGR>;

// Tree reduction over the workgroup (minmax_merge: one workgroup per call); the results
// land in slot 0.
fn reduce_minmax(lid: u32) {
    workgroupBarrier();
    for (var k = WGR / 2u; k > 0u; k = k >> 1u) {
        if (lid < k) {
            sa[lid] = nmin(sa[lid], sa[lid + k]);
            sb[lid] = nmax(sb[lid], sb[lid + k]);
        }
        workgroupBarrier();
    }
}

// gamma of channel c is +0 or -0 (compared by bits: a subnormal gamma is not 0 on any
// device, flushing or not).
fn zero_gamma(c: u32) -> bool {
    return (bitcast<u32>(bn[c]) & 0x7fffffffu) == 0u;
}

// s = gamma / sqrt(running_var + eps), as the CPU reference (both correctly rounded); 1 in a
// gamma = 0 channel of the finite form (params.finite_zero = 1).
fn scale_of(c: u32) -> f32 {
    if (params.finite_zero != 0u && zero_gamma(c)) {
        return 1.0;
    }
    let nc = params.channels;
    return div_rn(bn[c], sqrt_rn(bn[3u * nc + c] + params.eps));
}

// Channel c was run in the finite gamma = 0 form (reference::conv_bn's finite_zero_gamma):
// gamma = 0 and a saved scale factor that is not 0 (PyTorch's form saves s = 0 there).
fn finite_zero_channel(c: u32) -> bool {
    return zero_gamma(c) && s[c] != 0.0;
}

fn flat_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * (nwg.x * WGR);
}

@compute @workgroup_size(WGR)
fn scale_weight_partial(@builtin(global_invocation_id) gid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    let c = t / params.groups;
    if (c >= params.channels) {
        return;
    }
    let g = t % params.groups;
    let sc = scale_of(c);
    var lo = from_bits(0x7f800000u);
    var hi = from_bits(0xff800000u);
    let base = c * params.inner;
    let run = partial_run(g, params.inner, params.groups);
    for (var j = run.x; j < run.y; j = j + 1u) {
        let v = w[base + j] * sc;
        w_s[base + j] = v;
        lo = nmin(lo, v);
        hi = nmax(hi, v);
    }
    let k = c * params.groups + g;
    partials[k] = lo;
    partials[params.channels * params.groups + k] = hi;
}

@compute @workgroup_size(WGR)
fn scale_weight_partial4(@builtin(global_invocation_id) gid: vec3<u32>,
                         @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    let c = t / params.groups;
    if (c >= params.channels) {
        return;
    }
    let g = t % params.groups;
    let sc = scale_of(c);
    let inf = from_bits(0x7f800000u);
    var lo = vec4<f32>(inf);
    var hi = vec4<f32>(-inf);
    let inner4 = params.inner / 4u;
    let base = c * inner4;
    let run = partial_run(g, inner4, params.groups);
    for (var j = run.x; j < run.y; j = j + 1u) {
        let v = w4[base + j] * sc;
        w_s4[base + j] = v;
        lo = vec4<f32>(nmin(lo.x, v.x), nmin(lo.y, v.y), nmin(lo.z, v.z), nmin(lo.w, v.w));
        hi = vec4<f32>(nmax(hi.x, v.x), nmax(hi.y, v.y), nmax(hi.z, v.z), nmax(hi.w, v.w));
    }
    let k = c * params.groups + g;
    partials[k] = nmin(nmin(lo.x, lo.y), nmin(lo.z, lo.w));
    partials[params.channels * params.groups + k] = nmax(nmax(hi.x, hi.y), nmax(hi.z, hi.w));
}

@compute @workgroup_size(WGR)
fn scale_weight_final(@builtin(global_invocation_id) gid: vec3<u32>,
                      @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    if (c >= params.channels) {
        return;
    }
    var lo = from_bits(0x7f800000u);
    var hi = from_bits(0xff800000u);
    let cg = params.channels * params.groups;
    for (var g = 0u; g < params.groups; g = g + 1u) {
        lo = nmin(lo, partials[c * params.groups + g]);
        hi = nmax(hi, partials[cg + c * params.groups + g]);
    }
    let sc = scale_of(c);
    s[c] = sc;
    inv_s[c] = div_rn(1.0, sc);
    minmax[c] = lo;
    minmax[params.channels + c] = hi;
}

@compute @workgroup_size(WGR)
fn minmax_merge(@builtin(local_invocation_id) lid: vec3<u32>) {
    var lo = from_bits(0x7f800000u);
    var hi = from_bits(0xff800000u);
    for (var c = lid.x; c < params.channels; c = c + WGR) {
        lo = nmin(lo, minmax[c]);
        hi = nmax(hi, minmax[params.channels + c]);
    }
    sa[lid.x] = lo;
    sb[lid.x] = hi;
    reduce_minmax(lid.x);
    if (lid.x == 0u) {
        minmax_t[0] = sa[0];
        minmax_t[1] = sb[0];
    }
}

@compute @workgroup_size(WGR)
fn scale_factor(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    if (c >= params.channels) {
        return;
    }
    let sc = scale_of(c);
    s[c] = sc;
    inv_s[c] = div_rn(1.0, sc);
}

@compute @workgroup_size(WGR)
fn channel_op(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    let c = (i / params.inner) % params.channels;
    let v = x[i];
    switch params.op {
        case 0u: {
            out[i] = v / a[c];
        }
        case 1u: {
            out[i] = v + a[c];
        }
        case 2u: {
            out[i] = v * a[c];
        }
        case 3u: {
            out[i] = (v - b[c]) * a[c];
        }
        default: {
            out[i] = 1.0;
        }
    }
}

@compute @workgroup_size(WGR)
fn divide_back_partial(@builtin(global_invocation_id) gid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    let c = t / params.groups;
    if (c >= params.channels) {
        return;
    }
    let g = t % params.groups;
    let bias = b[c];
    let hw = params.hw;
    // Its contiguous run of values (lib/partial_run.wgsl); value j is element
    // (j / hw) * C * hw + c * hw + j % hw, (j / hw, j % hw) kept up to date.
    let run = partial_run(g, params.m, params.groups);
    var q = run.x / hw;
    var r = run.x % hw;
    var acc_g = 0.0;
    var acc_gx = 0.0;
    for (var j = run.x; j < run.y; j = j + 1u) {
        let i = (q * params.channels + c) * hw + r;
        let gv = x[i];
        acc_g = acc_g + gv;
        acc_gx = acc_gx + gv * (bn_in[i] - bias);
        r = r + 1u;
        if (r >= hw) {
            r = 0u;
            q = q + 1u;
        }
    }
    let k = c * params.groups + g;
    partials[k] = acc_g;
    partials[params.channels * params.groups + k] = acc_gx;
}

// No entry point below uses a barrier (lavapipe runs the barrier tree of a 256-invocation
// workgroup as coroutine switches, a fixed cost per workgroup far above its loads):
// divide_back_final and weight_grad_final take one invocation per channel over its G partials.
@compute @workgroup_size(WGR)
fn divide_back_final(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    let nc = params.channels;
    if (c >= nc) {
        return;
    }
    let cg = nc * params.groups;
    var acc_g = 0.0;
    var acc_gx = 0.0;
    for (var g = 0u; g < params.groups; g = g + 1u) {
        acc_g = acc_g + partials[c * params.groups + g];
        acc_gx = acc_gx + partials[cg + c * params.groups + g];
    }
    let inv_std = 1.0 / sqrt(bn[3u * nc + c] + params.eps);
    dbias[c] = s[c] * acc_g;
    dbeta[c] = bn_grads[c];
    if (finite_zero_channel(c)) {
        dgamma[c] = bn_grads[nc + c];
    } else {
        dgamma[c] = bn_grads[nc + c] - acc_gx * inv_std;
    }
}

@compute @workgroup_size(WGR)
fn weight_grad_partial(@builtin(global_invocation_id) gid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    let c = t / params.groups;
    if (c >= params.channels) {
        return;
    }
    let g = t % params.groups;
    let sc = s[c];
    let base = c * params.inner;
    var acc = 0.0;
    let run = partial_run(g, params.inner, params.groups);
    for (var j = run.x; j < run.y; j = j + 1u) {
        let gw = dw_q[base + j] * mask[base + j];
        dw[base + j] = gw * sc;
        acc = acc + gw * w[base + j];
    }
    partials[c * params.groups + g] = acc;
}

// weight_grad_partial on vec4s (a channel's weights a multiple of 4): the same per-element
// arithmetic, each lane its own sum, the four lanes added at the end.
@compute @workgroup_size(WGR)
fn weight_grad_partial4(@builtin(global_invocation_id) gid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    let c = t / params.groups;
    if (c >= params.channels) {
        return;
    }
    let g = t % params.groups;
    let sc = s[c];
    let inner4 = params.inner / 4u;
    let base = c * inner4;
    var acc = vec4<f32>(0.0);
    let run = partial_run(g, inner4, params.groups);
    for (var j = run.x; j < run.y; j = j + 1u) {
        let gw = dw_q4[base + j] * mask4[base + j];
        dw4[base + j] = gw * sc;
        acc = acc + gw * w4[base + j];
    }
    partials[c * params.groups + g] = (acc.x + acc.y) + (acc.z + acc.w);
}

@compute @workgroup_size(WGR)
fn weight_grad_final(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    if (c >= params.channels || finite_zero_channel(c)) {
        return;
    }
    var acc = 0.0;
    for (var g = 0u; g < params.groups; g = g + 1u) {
        acc = acc + partials[c * params.groups + g];
    }
    let inv_std = 1.0 / sqrt(bn[3u * params.channels + c] + params.eps);
    dgamma[c] = dgamma[c] + acc * inv_std;
}

@compute @workgroup_size(WGR)
fn eval_scale(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat_index(gid, nwg);
    let nc = params.channels;
    if (c >= nc) {
        return;
    }
    let gamma = bn[c];
    let r = div_rn(1.0, sqrt_rn(bn[3u * nc + c] + params.eps));
    s[c] = gamma * r;
    out[c] = (b[c] - bn[2u * nc + c]) * r * gamma + bn[nc + c];
}

@compute @workgroup_size(WGR)
fn sqrt_rn_test(@builtin(global_invocation_id) gid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat_index(gid, nwg);
    if (i >= params.n) {
        return;
    }
    out[i] = sqrt_rn(x[i]);
}
