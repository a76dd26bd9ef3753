// conv2d.wgsl: 2-D convolution (NCHW input, OIHW weight, zero padding, stride, dilation,
// requires: lib/float_bits.wgsl
// requires: lib/activation.wgsl
// requires: lib/partial_run.wgsl
// groups incl. depthwise), forward with a fused epilogue, the input and weight gradients, and a
// per-channel sum (the bias gradient). f32 loads, f32 accumulation; matches
// src/reference/conv2d.rs up to summation order.
//
//   forward:  y[n, o, oy, ox] = act(acc * out_scale[o] + bias[o]),
//             acc = sum over ci < CG, ky < KH, kx < KW of w[o, ci, ky, kx] *
//                   x[n, g*CG + ci, oy*SH + ky*DH - PH, ox*SW + kx*DW - PW]   (g = o / OG,
//                   zero outside the input); act: 0 identity, 1 ReLU, 2 ReLU6, 3 LeakyReLU
//                   (slope), 4 Hardswish (NaN propagates, as in activation.wgsl);
//                   out_scale / bias only when has_scale / has_bias.
//   backward_input:  dx[n, c, iy, ix] = sum over the taps (ky, kx) and the OG output channels
//                    of c's group whose window covers (iy, ix) of dy * w (a gather, no atomics).
//   transpose_forward: conv_transpose2d, which is exactly backward_input with the transposed
//                    conv's input as dy and its output as dx (geometry: n, c, h, w describe the
//                    transposed conv's OUTPUT [N, Cout, OH, OW]; o, oh, ow its input
//                    [N, Cin, H, W]; weight [Cin, Cout/g, KH, KW]), then the epilogue of channel
//                    c: y = act(acc * out_scale[c] + bias[c]).
//   backward_weight: dw[o, ci, ky, kx] = sum over n, oy, ox of dy[n, o, oy, ox] * x[...].
//   channel_sum:     out[c] = sum over n, h, w of x[n, c, h, w].
//
// Bindings (group 0):
//   @group(0) @binding(0) P:         uniform Params  geometry: input n, c, h, w; weight o, kh, kw;
//                                    groups; output oh, ow; cg = c / groups, og = o / groups;
//                                    stride, pad, dilation (h, w); k = cg*kh*kw; npix = n*oh*ow;
//                                    ptiles / mtiles (forward_gemm tiles over pixels / output
//                                    channels of one group); count (work items, see Dispatch);
//                                    act; has_scale, has_bias; slope (LeakyReLU); stats
//                                    (forward_dw: 1 writes dw_stats)
//   @group(0) @binding(1) x:         storage, read array<f32>  input [N, C, H, W] (channel_sum:
//                                    the tensor summed)
//   @group(0) @binding(2) wt:        storage, read array<f32>  weight [O, CG, KH, KW]
//   @group(0) @binding(3) out:       storage, read_write array<f32>  y / dx / dw / channel sums
//   @group(0) @binding(4) out_scale: storage, read array<f32>  [O] epilogue multiplier (any
//                                    buffer when has_scale = 0)
//   @group(0) @binding(5) bias:      storage, read array<f32>  [O] epilogue bias (any buffer when
//                                    has_bias = 0)
//   @group(0) @binding(6) dy:        storage, read array<f32>  upstream gradient [N, O, OH, OW]
//   @group(0) @binding(7) x4:        storage, read array<vec4<f32>>  x as vec4s (forward_dw)
//   @group(0) @binding(8) out4:      storage, read_write array<vec4<f32>>  y as vec4s (forward_dw)
//   @group(0) @binding(9) dw_stats:  storage, read_write array<f32>  forward_dw with stats = 1:
//                                    [3, C, N * ceil(OH / 4)] statistics partials of y (count,
//                                    mean, M2 per invocation, lib/partial_run.wgsl's layout);
//                                    any buffer when stats = 0
//
// Entry points and dispatch shapes (every grid is tiled over x and y past 65,535 workgroups per
// dimension; the flat id is bounds-checked against count):
//   forward_gemm (0-5): implicit GEMM, per group g: Y_g[OG, N*OH*OW] = W_g[OG, K] . X_g[K, N*OH*OW],
//     the im2col matrix X_g gathered on the fly into workgroup memory, never materialized.
//     Workgroup (16, 16, 1) computes a 64 (output channels) x 64 (output pixels) tile in K-steps
//     of 16, each invocation a 4x4 register tile (channels ty + 16i, pixels tx + 16j, so shared
//     reads are broadcast / consecutive and stores coalesced). One workgroup per tile:
//     count = mtiles * ptiles * groups workgroups, flat id = wid.x + wid.y * nwg.x, decomposed as
//     (output-channel tile fastest, pixel tile, group).
//   forward_direct (0-5): one invocation per output element (grouped / depthwise convs with few
//     output channels per group). Workgroup (WG, 1, 1), WG an override constant (default 256);
//     count = N*O*OH*OW items, flat index gid.x + gid.y * nwg.x * WG.
//   forward_reg (0-5): register-blocked direct conv for CPU adapters (lavapipe / llvmpipe), no
//     workgroup memory and no barriers. Each invocation computes RB_O output channels of one
//     group x 8 consecutive output pixels of one output row (ox0 = 8 * block) in 2 * RB_O vec4
//     accumulators, reading x and w straight from storage: per input channel and kernel row,
//     the 8 pixels' inputs are loaded once and reused for all RB_O channels, each weight once
//     and reused for all 8 pixels. Workgroup (RB_WG, 1, 1) over consecutive 8-pixel blocks
//     (row-major over n, oy, block; all invocations of a workgroup share the channel block);
//     count = mtiles * ptiles * groups workgroups, mtiles = ceil(OG / RB_O),
//     ptiles = ceil(N*OH*ceil(OW/8) / RB_WG), flat id = wid.x + wid.y * nwg.x, decomposed as
//     (channel block fastest, pixel tile, group).
//     Override constants (chosen by the launcher, src/kernels/conv2d.rs):
//       RB_O  (1, 2, 4, 8; default 8): channels per invocation, the largest of these <= OG.
//       RB_K3 (0 / 1; default 0): 1 when KW == 3, stride_w == 1, dil_w == 1, where one row of 10
//             inputs feeds all 3 taps of the 8 pixels (10 loads instead of 24).
//       RB_WG (default 64): invocations per workgroup.
//     Why on CPU adapters: llvmpipe runs a workgroup on one thread with the invocations in 8-wide
//     SIMD lanes; every storage or workgroup-memory load is a per-lane scalar loop (about as
//     costly as 10 fmas per lane) and barriers switch coroutines, so the tiled forward_gemm,
//     which stages every operand through workgroup memory, is load- and barrier-bound there.
//     forward_reg does fewer loads per fma (192 lane-fmas per 34 loads per kernel row with
//     RB_O = 8, RB_K3 = 1) and no barriers. On discrete GPUs forward_gemm stays the choice.
//     Where the device has subgroups, conv2d_subgroup.wgsl (forward_sg) is this kernel with 16
//     channels per invocation and its weights shared by subgroupBroadcast.
//   forward_dw (0, 2, 4, 5, 7, 8, 9): depthwise 3x3 convs (one channel per group, C = O) at stride
//     1, dilation 1, left / right padding 1 (so OW = W), W a multiple of 4, any top padding: each
//     invocation computes DW_ROWS = 4 output rows of one (n, c) plane and walks them left to
//     right one vec4 of 4 columns at a time. It keeps, per input row (6 rows for 4 output
//     rows), the current and next vec4 and the last value of the previous one, so each step
//     loads one new vec4 per input row (6 vec4 loads and 4 vec4 stores for 16 outputs) and
//     builds the left- and right-shifted vectors of the 3 taps from registers. Workgroup
//     (DW_WG, 1, 1); count = N*C*ceil(OH/4) items, flat index gid.x + gid.y * nwg.x * DW_WG.
//     Memory-bound (2.25 flop per byte): the vec4 loads are what brings it near the copy
//     bandwidth, where forward_reg loads 10 scalars per kernel row for 8 outputs.
//     With stats = 1 each invocation also reduces the outputs it stores (Welford per vec4 lane
//     on the values less its first stored vec4, lib/partial_run.wgsl) and writes their count,
//     mean and M2 as partial g = n * ceil(OH / 4) + oy0 / 4 of channel c: the partials of a
//     channel are contiguous runs of its values in order, what batch_norm.wgsl's stats_final
//     combines, so a BatchNorm after the conv needs no statistics pass over y.
//   backward_input (0, 2, 3, 6): one invocation per dx element, workgroup (WG, 1, 1);
//     count = N*C*H*W items, flat index as forward_direct.
//   transpose_forward (0, 2, 3, 4, 5, 6): as backward_input (dy = the transposed conv's input),
//     one invocation per output element.
//   backward_weight (0, 1, 3, 6): one workgroup of 256 per weight element, which splits the
//     N*OH*OW reduction over its invocations and reduces in workgroup memory;
//     count = O*CG*KH*KW workgroups, flat id = wid.x + wid.y * nwg.x.
//   channel_sum (0, 1, 3): one workgroup of 256 per channel (n, c, h, w describe the tensor);
//     count = C workgroups, flat id = wid.x + wid.y * nwg.x.

override WG: u32 = 256u;

// forward_gemm tile: BM output channels x BN output pixels, BK-deep K steps.
const BM: u32 = 64u;
const BN: u32 = 64u;
const BK: u32 = 16u;
// Row stride of the weight tile in workgroup memory (BM + 1 avoids bank conflicts on stores).
const A_STRIDE: u32 = 65u;
// Workgroup size of the reduction entry points.
const RED: u32 = 256u;

struct Params {
    n: u32,
    c: u32,
    h: u32,
    w: u32,
    o: u32,
    kh: u32,
    kw: u32,
    groups: u32,
    oh: u32,
    ow: u32,
    cg: u32,
    og: u32,
    stride_h: u32,
    stride_w: u32,
    pad_h: u32,
    pad_w: u32,
    dil_h: u32,
    dil_w: u32,
    k: u32,
    npix: u32,
    ptiles: u32,
    mtiles: u32,
    count: u32,
    act: u32,
    has_scale: u32,
    has_bias: u32,
    slope: f32,
    stats: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> wt: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> out_scale: array<f32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read> dy: array<f32>;
@group(0) @binding(7) var<storage, read> x4: array<vec4<f32>>;
@group(0) @binding(8) var<storage, read_write> out4: array<vec4<f32>>;
@group(0) @binding(9) var<storage, read_write> dw_stats: array<f32>;

// Weight tile [BK][A_STRIDE] and im2col tile [BK][BN] of forward_gemm.
var<workgroup> a_tile: array<f32, 1040>;
var<workgroup> b_tile: array<f32, 1024>;
// Partial sums of the reductions.
var<workgroup> red: array<f32, 256>;

fn activate(v: f32) -> f32 {
    return act_apply(v, P.act, P.slope);
}

fn epilogue(acc: f32, oc: u32) -> f32 {
    var v = acc;
    if (P.has_scale != 0u) {
        v = v * out_scale[oc];
    }
    if (P.has_bias != 0u) {
        v = v + bias[oc];
    }
    return activate(v);
}

// Stores one row of a 4x4 register tile: output channel gm of group g, pixels pbase + 16j.
fn store_row(v: vec4<f32>, g: u32, gm: u32, pbase: u32) {
    if (gm >= P.og) {
        return;
    }
    let oc = g * P.og + gm;
    let ohw = P.oh * P.ow;
    for (var j = 0u; j < 4u; j = j + 1u) {
        let p = pbase + 16u * j;
        if (p < P.npix) {
            let n = p / ohw;
            out[(n * P.o + oc) * ohw + p % ohw] = epilogue(v[j], oc);
        }
    }
}

@compute @workgroup_size(16, 16, 1)
fn forward_gemm(@builtin(local_invocation_id) lid: vec3<u32>,
                @builtin(local_invocation_index) li: u32,
                @builtin(workgroup_id) wid: vec3<u32>,
                @builtin(num_workgroups) nwg: vec3<u32>) {
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= P.count) {
        return;
    }
    let mt = tile % P.mtiles;
    let rest = tile / P.mtiles;
    let pt = rest % P.ptiles;
    let g = rest / P.ptiles;
    let m0 = mt * BM;
    let p0 = pt * BN;
    let ohw = P.oh * P.ow;
    let khw = P.kh * P.kw;
    let hw = P.h * P.w;
    let hi = i32(P.h);
    let wi = i32(P.w);

    // im2col loader: this invocation fills column bcol (one output pixel), rows 4*brow + r.
    let bcol = li % BN;
    let brow = li / BN;
    let p = p0 + bcol;
    let p_ok = p < P.npix;
    let pc = select(0u, p, p_ok);
    let n = pc / ohw;
    let r = pc % ohw;
    let iy0 = i32((r / P.ow) * P.stride_h) - i32(P.pad_h);
    let ix0 = i32((r % P.ow) * P.stride_w) - i32(P.pad_w);
    let x_base = (n * P.c + g * P.cg) * hw;

    // Weight loader: column acol (k within the step) at rows arow + 16r.
    let acol = li % BK;
    let arow = li / BK;
    let w_row0 = g * P.og + m0;

    let tx = lid.x;
    let ty = lid.y;
    var acc0 = vec4<f32>(0.0);
    var acc1 = vec4<f32>(0.0);
    var acc2 = vec4<f32>(0.0);
    var acc3 = vec4<f32>(0.0);

    for (var k0 = 0u; k0 < P.k; k0 = k0 + BK) {
        let ka = k0 + acol;
        for (var i = 0u; i < 4u; i = i + 1u) {
            let m = arow + 16u * i;
            var v = 0.0;
            if (m0 + m < P.og && ka < P.k) {
                v = wt[(w_row0 + m) * P.k + ka];
            }
            a_tile[acol * A_STRIDE + m] = v;
        }
        // Rows 4*brow .. 4*brow + 3: one division for the first, then step through the taps.
        let kb0 = k0 + 4u * brow;
        var ci = kb0 / khw;
        let t = kb0 % khw;
        var ky = t / P.kw;
        var kx = t % P.kw;
        for (var i = 0u; i < 4u; i = i + 1u) {
            let kr = 4u * brow + i;
            var v = 0.0;
            if (p_ok && k0 + kr < P.k) {
                let iy = iy0 + i32(ky * P.dil_h);
                let ix = ix0 + i32(kx * P.dil_w);
                if (iy >= 0 && iy < hi && ix >= 0 && ix < wi) {
                    v = x[x_base + ci * hw + u32(iy) * P.w + u32(ix)];
                }
            }
            b_tile[kr * BN + bcol] = v;
            kx = kx + 1u;
            if (kx == P.kw) {
                kx = 0u;
                ky = ky + 1u;
                if (ky == P.kh) {
                    ky = 0u;
                    ci = ci + 1u;
                }
            }
        }
        workgroupBarrier();
        for (var kk = 0u; kk < BK; kk = kk + 1u) {
            let ab = kk * A_STRIDE + ty;
            let a = vec4<f32>(a_tile[ab], a_tile[ab + 16u], a_tile[ab + 32u], a_tile[ab + 48u]);
            let bb = kk * BN + tx;
            let b = vec4<f32>(b_tile[bb], b_tile[bb + 16u], b_tile[bb + 32u], b_tile[bb + 48u]);
            acc0 = acc0 + a.x * b;
            acc1 = acc1 + a.y * b;
            acc2 = acc2 + a.z * b;
            acc3 = acc3 + a.w * b;
        }
        workgroupBarrier();
    }

    let pbase = p0 + tx;
    store_row(acc0, g, m0 + ty, pbase);
    store_row(acc1, g, m0 + ty + 16u, pbase);
    store_row(acc2, g, m0 + ty + 32u, pbase);
    store_row(acc3, g, m0 + ty + 48u, pbase);
}

@compute @workgroup_size(WG)
fn forward_direct(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= P.count) {
        return;
    }
    let ox = i % P.ow;
    var t = i / P.ow;
    let oy = t % P.oh;
    t = t / P.oh;
    let oc = t % P.o;
    let n = t / P.o;
    let g = oc / P.og;
    let hw = P.h * P.w;
    let khw = P.kh * P.kw;
    let iy0 = i32(oy * P.stride_h) - i32(P.pad_h);
    let ix0 = i32(ox * P.stride_w) - i32(P.pad_w);
    var acc = 0.0;
    for (var ci = 0u; ci < P.cg; ci = ci + 1u) {
        let xb = (n * P.c + g * P.cg + ci) * hw;
        let wb = (oc * P.cg + ci) * khw;
        for (var ky = 0u; ky < P.kh; ky = ky + 1u) {
            let iy = iy0 + i32(ky * P.dil_h);
            if (iy < 0 || iy >= i32(P.h)) {
                continue;
            }
            let xr = xb + u32(iy) * P.w;
            let wr = wb + ky * P.kw;
            for (var kx = 0u; kx < P.kw; kx = kx + 1u) {
                let ix = ix0 + i32(kx * P.dil_w);
                if (ix >= 0 && ix < i32(P.w)) {
                    acc = acc + wt[wr + kx] * x[xr + u32(ix)];
                }
            }
        }
    }
    out[i] = epilogue(acc, oc);
}

// forward_reg: see the header. Tile: RB_O (1, 2, 4 or 8) output channels x 8 consecutive output
// pixels of one output row per invocation, accumulated in 2 * RB_O vec4 registers.
override RB_O: u32 = 8u;
// 1: the rows are 3 taps wide at stride 1, dilation 1 (kw == 3, stride_w == 1, dil_w == 1), so
// one row of 10 input values serves all 8 pixels and 3 taps; 0: any kernel width / stride /
// dilation (8 loads per tap).
override RB_K3: u32 = 0u;
// Workgroup size of forward_reg.
override RB_WG: u32 = 64u;

// x[xr + ix], or 0 when column ix is outside [0, W) (no out-of-bounds read).
fn x_col(xr: u32, ix: i32) -> f32 {
    let ok = ix >= 0 && ix < i32(P.w);
    return select(0.0, x[select(0u, xr + u32(ix), ok)], ok);
}

// Stores channel gm's 8 pixels (ox0 .. ox0 + 7 of output row `row`), skipping those past OW.
fn store_reg(lo: vec4<f32>, hi: vec4<f32>, g: u32, gm: u32, row: u32, ox0: u32) {
    if (gm >= P.og) {
        return;
    }
    let oc = g * P.og + gm;
    let base = (row / P.oh * P.o + oc) * P.oh * P.ow + (row % P.oh) * P.ow + ox0;
    for (var j = 0u; j < 4u; j = j + 1u) {
        if (ox0 + j < P.ow) {
            out[base + j] = epilogue(lo[j], oc);
        }
        if (ox0 + 4u + j < P.ow) {
            out[base + 4u + j] = epilogue(hi[j], oc);
        }
    }
}

@compute @workgroup_size(RB_WG)
fn forward_reg(@builtin(local_invocation_index) li: u32,
               @builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let tile = wid.x + wid.y * nwg.x;
    if (tile >= P.count) {
        return;
    }
    // Output-channel block fastest (neighbouring workgroups share their input rows), then the
    // pixel block, then the group.
    let mt = tile % P.mtiles;
    let rest = tile / P.mtiles;
    let pt = rest % P.ptiles;
    let g = rest / P.ptiles;
    let owb = (P.ow + 7u) / 8u;
    let q = pt * RB_WG + li;
    let row = q / owb;              // n * OH + oy
    // No barriers below, so the invocations past the last block can leave now.
    if (row >= P.n * P.oh) {
        return;
    }
    let n = row / P.oh;
    let oy = row % P.oh;
    let ox0 = (q % owb) * 8u;
    let m0 = mt * RB_O;
    let hw = P.h * P.w;
    let khw = P.kh * P.kw;
    let iy0 = i32(oy * P.stride_h) - i32(P.pad_h);
    let ix0 = i32(ox0 * P.stride_w) - i32(P.pad_w);
    let sw = i32(P.stride_w);
    let x_base = (n * P.c + g * P.cg) * hw;
    // Weight row of each channel of the block (the last channel of the group stands in for
    // those past it, whose results are never stored).
    let wb0 = (g * P.og + min(m0 + 0u, P.og - 1u)) * P.k;
    let wb1 = (g * P.og + min(m0 + 1u, P.og - 1u)) * P.k;
    let wb2 = (g * P.og + min(m0 + 2u, P.og - 1u)) * P.k;
    let wb3 = (g * P.og + min(m0 + 3u, P.og - 1u)) * P.k;
    let wb4 = (g * P.og + min(m0 + 4u, P.og - 1u)) * P.k;
    let wb5 = (g * P.og + min(m0 + 5u, P.og - 1u)) * P.k;
    let wb6 = (g * P.og + min(m0 + 6u, P.og - 1u)) * P.k;
    let wb7 = (g * P.og + min(m0 + 7u, P.og - 1u)) * P.k;
    var a0 = vec4<f32>(0.0);
    var b0 = vec4<f32>(0.0);
    var a1 = vec4<f32>(0.0);
    var b1 = vec4<f32>(0.0);
    var a2 = vec4<f32>(0.0);
    var b2 = vec4<f32>(0.0);
    var a3 = vec4<f32>(0.0);
    var b3 = vec4<f32>(0.0);
    var a4 = vec4<f32>(0.0);
    var b4 = vec4<f32>(0.0);
    var a5 = vec4<f32>(0.0);
    var b5 = vec4<f32>(0.0);
    var a6 = vec4<f32>(0.0);
    var b6 = vec4<f32>(0.0);
    var a7 = vec4<f32>(0.0);
    var b7 = vec4<f32>(0.0);
    for (var ci = 0u; ci < P.cg; ci = ci + 1u) {
        let xc = x_base + ci * hw;
        let wc = ci * khw;
        for (var ky = 0u; ky < P.kh; ky = ky + 1u) {
            let iy = iy0 + i32(ky * P.dil_h);
            if (iy < 0 || iy >= i32(P.h)) {
                continue;
            }
            let xr = xc + u32(iy) * P.w;
            let wr = wc + ky * P.kw;
            if (RB_K3 == 1u) {
                let x0 = x_col(xr, ix0 + 0);
                let x1 = x_col(xr, ix0 + 1);
                let x2 = x_col(xr, ix0 + 2);
                let x3 = x_col(xr, ix0 + 3);
                let x4 = x_col(xr, ix0 + 4);
                let x5 = x_col(xr, ix0 + 5);
                let x6 = x_col(xr, ix0 + 6);
                let x7 = x_col(xr, ix0 + 7);
                let x8 = x_col(xr, ix0 + 8);
                let x9 = x_col(xr, ix0 + 9);
                let l0 = vec4<f32>(x0, x1, x2, x3);
                let h0 = vec4<f32>(x4, x5, x6, x7);
                let l1 = vec4<f32>(x1, x2, x3, x4);
                let h1 = vec4<f32>(x5, x6, x7, x8);
                let l2 = vec4<f32>(x2, x3, x4, x5);
                let h2 = vec4<f32>(x6, x7, x8, x9);
                let w0 = vec3<f32>(wt[wb0 + wr], wt[wb0 + wr + 1u], wt[wb0 + wr + 2u]);
                a0 = fma(vec4<f32>(w0.z), l2, fma(vec4<f32>(w0.y), l1, fma(vec4<f32>(w0.x), l0, a0)));
                b0 = fma(vec4<f32>(w0.z), h2, fma(vec4<f32>(w0.y), h1, fma(vec4<f32>(w0.x), h0, b0)));
                if (RB_O > 1u) {
                    let w1 = vec3<f32>(wt[wb1 + wr], wt[wb1 + wr + 1u], wt[wb1 + wr + 2u]);
                    a1 = fma(vec4<f32>(w1.z), l2, fma(vec4<f32>(w1.y), l1, fma(vec4<f32>(w1.x), l0, a1)));
                    b1 = fma(vec4<f32>(w1.z), h2, fma(vec4<f32>(w1.y), h1, fma(vec4<f32>(w1.x), h0, b1)));
                }
                if (RB_O > 2u) {
                    let w2 = vec3<f32>(wt[wb2 + wr], wt[wb2 + wr + 1u], wt[wb2 + wr + 2u]);
                    a2 = fma(vec4<f32>(w2.z), l2, fma(vec4<f32>(w2.y), l1, fma(vec4<f32>(w2.x), l0, a2)));
                    b2 = fma(vec4<f32>(w2.z), h2, fma(vec4<f32>(w2.y), h1, fma(vec4<f32>(w2.x), h0, b2)));
                }
                if (RB_O > 3u) {
                    let w3 = vec3<f32>(wt[wb3 + wr], wt[wb3 + wr + 1u], wt[wb3 + wr + 2u]);
                    a3 = fma(vec4<f32>(w3.z), l2, fma(vec4<f32>(w3.y), l1, fma(vec4<f32>(w3.x), l0, a3)));
                    b3 = fma(vec4<f32>(w3.z), h2, fma(vec4<f32>(w3.y), h1, fma(vec4<f32>(w3.x), h0, b3)));
                }
                if (RB_O > 4u) {
                    let w4 = vec3<f32>(wt[wb4 + wr], wt[wb4 + wr + 1u], wt[wb4 + wr + 2u]);
                    a4 = fma(vec4<f32>(w4.z), l2, fma(vec4<f32>(w4.y), l1, fma(vec4<f32>(w4.x), l0, a4)));
                    b4 = fma(vec4<f32>(w4.z), h2, fma(vec4<f32>(w4.y), h1, fma(vec4<f32>(w4.x), h0, b4)));
                }
                if (RB_O > 5u) {
                    let w5 = vec3<f32>(wt[wb5 + wr], wt[wb5 + wr + 1u], wt[wb5 + wr + 2u]);
                    a5 = fma(vec4<f32>(w5.z), l2, fma(vec4<f32>(w5.y), l1, fma(vec4<f32>(w5.x), l0, a5)));
                    b5 = fma(vec4<f32>(w5.z), h2, fma(vec4<f32>(w5.y), h1, fma(vec4<f32>(w5.x), h0, b5)));
                }
                if (RB_O > 6u) {
                    let w6 = vec3<f32>(wt[wb6 + wr], wt[wb6 + wr + 1u], wt[wb6 + wr + 2u]);
                    a6 = fma(vec4<f32>(w6.z), l2, fma(vec4<f32>(w6.y), l1, fma(vec4<f32>(w6.x), l0, a6)));
                    b6 = fma(vec4<f32>(w6.z), h2, fma(vec4<f32>(w6.y), h1, fma(vec4<f32>(w6.x), h0, b6)));
                }
                if (RB_O > 7u) {
                    let w7 = vec3<f32>(wt[wb7 + wr], wt[wb7 + wr + 1u], wt[wb7 + wr + 2u]);
                    a7 = fma(vec4<f32>(w7.z), l2, fma(vec4<f32>(w7.y), l1, fma(vec4<f32>(w7.x), l0, a7)));
                    b7 = fma(vec4<f32>(w7.z), h2, fma(vec4<f32>(w7.y), h1, fma(vec4<f32>(w7.x), h0, b7)));
                }
            } else {
                for (var kx = 0u; kx < P.kw; kx = kx + 1u) {
                    let ix = ix0 + i32(kx * P.dil_w);
                    let l = vec4<f32>(x_col(xr, ix), x_col(xr, ix + sw), x_col(xr, ix + 2 * sw),
                                      x_col(xr, ix + 3 * sw));
                    let h = vec4<f32>(x_col(xr, ix + 4 * sw), x_col(xr, ix + 5 * sw),
                                      x_col(xr, ix + 6 * sw), x_col(xr, ix + 7 * sw));
                    let wk = wr + kx;
                    let w0 = vec4<f32>(wt[wb0 + wk]);
                    a0 = fma(w0, l, a0);
                    b0 = fma(w0, h, b0);
                    if (RB_O > 1u) {
                        let w1 = vec4<f32>(wt[wb1 + wk]);
                        a1 = fma(w1, l, a1);
                        b1 = fma(w1, h, b1);
                    }
                    if (RB_O > 2u) {
                        let w2 = vec4<f32>(wt[wb2 + wk]);
                        a2 = fma(w2, l, a2);
                        b2 = fma(w2, h, b2);
                    }
                    if (RB_O > 3u) {
                        let w3 = vec4<f32>(wt[wb3 + wk]);
                        a3 = fma(w3, l, a3);
                        b3 = fma(w3, h, b3);
                    }
                    if (RB_O > 4u) {
                        let w4 = vec4<f32>(wt[wb4 + wk]);
                        a4 = fma(w4, l, a4);
                        b4 = fma(w4, h, b4);
                    }
                    if (RB_O > 5u) {
                        let w5 = vec4<f32>(wt[wb5 + wk]);
                        a5 = fma(w5, l, a5);
                        b5 = fma(w5, h, b5);
                    }
                    if (RB_O > 6u) {
                        let w6 = vec4<f32>(wt[wb6 + wk]);
                        a6 = fma(w6, l, a6);
                        b6 = fma(w6, h, b6);
                    }
                    if (RB_O > 7u) {
                        let w7 = vec4<f32>(wt[wb7 + wk]);
                        a7 = fma(w7, l, a7);
                        b7 = fma(w7, h, b7);
                    }
                }
            }
        }
    }
    store_reg(a0, b0, g, m0, row, ox0);
    if (RB_O > 1u) {
        store_reg(a1, b1, g, m0 + 1u, row, ox0);
    }
    if (RB_O > 2u) {
        store_reg(a2, b2, g, m0 + 2u, row, ox0);
    }
    if (RB_O > 3u) {
        store_reg(a3, b3, g, m0 + 3u, row, ox0);
    }
    if (RB_O > 4u) {
        store_reg(a4, b4, g, m0 + 4u, row, ox0);
    }
    if (RB_O > 5u) {
        store_reg(a5, b5, g, m0 + 5u, row, ox0);
    }
    if (RB_O > 6u) {
        store_reg(a6, b6, g, m0 + 6u, row, ox0);
    }
    if (RB_O > 7u) {
        store_reg(a7, b7, g, m0 + 7u, row, ox0);
    }
}

// The gather of backward_input for flat dx index i (also transpose_forward's accumulator).
// forward_dw: see the header.
const DW_ROWS: u32 = 4u;
const DW_WG: u32 = 64u;

// Vec4 q of input row iy of plane `plane` (w4 vec4s per row), or zeros outside the input.
// Branch-free: the index is clamped into the plane and the value selected.
fn dw_load(plane: u32, iy: i32, q: u32, w4: u32) -> vec4<f32> {
    let ok = iy >= 0 && iy < i32(P.h) && q < w4;
    let row = u32(clamp(iy, 0, i32(P.h) - 1));
    let v = x4[(plane * P.h + row) * w4 + min(q, w4 - 1u)];
    return select(vec4<f32>(0.0), v, ok);
}

// One output row's vec4: the 3x3 taps over input rows (l: shifted right by one column, m: the
// aligned vec4, r: shifted left) a, b, c with kernel rows k0, k1, k2.
fn dw_row(la: vec4<f32>, ma: vec4<f32>, ra: vec4<f32>, lb: vec4<f32>, mb: vec4<f32>,
          rb: vec4<f32>, lc: vec4<f32>, mc: vec4<f32>, rc: vec4<f32>, k0: vec3<f32>,
          k1: vec3<f32>, k2: vec3<f32>) -> vec4<f32> {
    var a = la * k0.x;
    a = fma(ma, vec4<f32>(k0.y), a);
    a = fma(ra, vec4<f32>(k0.z), a);
    a = fma(lb, vec4<f32>(k1.x), a);
    a = fma(mb, vec4<f32>(k1.y), a);
    a = fma(rb, vec4<f32>(k1.z), a);
    a = fma(lc, vec4<f32>(k2.x), a);
    a = fma(mc, vec4<f32>(k2.y), a);
    a = fma(rc, vec4<f32>(k2.z), a);
    return a;
}

// The epilogue of 4 outputs of channel oc (scale s and bias b already loaded); returns what
// it stored.
fn dw_store(acc: vec4<f32>, s: f32, b: f32, idx: u32) -> vec4<f32> {
    var v = acc;
    if (P.has_scale != 0u) {
        v = v * s;
    }
    if (P.has_bias != 0u) {
        v = v + b;
    }
    if (P.act != 0u) {
        v = vec4<f32>(activate(v.x), activate(v.y), activate(v.z), activate(v.w));
    }
    out4[idx] = v;
    return v;
}

@compute @workgroup_size(DW_WG)
fn forward_dw(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * (nwg.x * DW_WG);
    if (t >= P.count) {
        return;
    }
    let blocks = (P.oh + DW_ROWS - 1u) / DW_ROWS;
    let plane = t / blocks;          // n * C + c (= n * O + c)
    let oy0 = (t % blocks) * DW_ROWS;
    let c = plane % P.c;
    let w4 = P.w / 4u;
    let iy0 = i32(oy0) - i32(P.pad_h);
    let wb = c * 9u;
    let k0 = vec3<f32>(wt[wb], wt[wb + 1u], wt[wb + 2u]);
    let k1 = vec3<f32>(wt[wb + 3u], wt[wb + 4u], wt[wb + 5u]);
    let k2 = vec3<f32>(wt[wb + 6u], wt[wb + 7u], wt[wb + 8u]);
    var s = 1.0;
    if (P.has_scale != 0u) {
        s = out_scale[c];
    }
    var b = 0.0;
    if (P.has_bias != 0u) {
        b = bias[c];
    }
    // Output rows past OH are computed from zero rows and not stored.
    let live = min(P.oh - oy0, DW_ROWS);
    let obase = (plane * P.oh + oy0) * w4;
    // Per input row r: the current vec4 (m), the next one (n), the previous one's last value (p).
    var m0 = dw_load(plane, iy0, 0u, w4);
    var m1 = dw_load(plane, iy0 + 1, 0u, w4);
    var m2 = dw_load(plane, iy0 + 2, 0u, w4);
    var m3 = dw_load(plane, iy0 + 3, 0u, w4);
    var m4 = dw_load(plane, iy0 + 4, 0u, w4);
    var m5 = dw_load(plane, iy0 + 5, 0u, w4);
    var p0 = 0.0;
    var p1 = 0.0;
    var p2 = 0.0;
    var p3 = 0.0;
    var p4 = 0.0;
    var p5 = 0.0;
    // The statistics epilogue (uniform): Welford per lane of the stored vec4s less the first.
    let stats = P.stats != 0u;
    var wf = welford4_new();
    var shift = vec4<f32>(0.0);
    for (var q = 0u; q < w4; q = q + 1u) {
        let n0 = dw_load(plane, iy0, q + 1u, w4);
        let n1 = dw_load(plane, iy0 + 1, q + 1u, w4);
        let n2 = dw_load(plane, iy0 + 2, q + 1u, w4);
        let n3 = dw_load(plane, iy0 + 3, q + 1u, w4);
        let n4 = dw_load(plane, iy0 + 4, q + 1u, w4);
        let n5 = dw_load(plane, iy0 + 5, q + 1u, w4);
        let l0 = vec4<f32>(p0, m0.xyz);
        let l1 = vec4<f32>(p1, m1.xyz);
        let l2 = vec4<f32>(p2, m2.xyz);
        let l3 = vec4<f32>(p3, m3.xyz);
        let l4 = vec4<f32>(p4, m4.xyz);
        let l5 = vec4<f32>(p5, m5.xyz);
        let r0 = vec4<f32>(m0.yzw, n0.x);
        let r1 = vec4<f32>(m1.yzw, n1.x);
        let r2 = vec4<f32>(m2.yzw, n2.x);
        let r3 = vec4<f32>(m3.yzw, n3.x);
        let r4 = vec4<f32>(m4.yzw, n4.x);
        let r5 = vec4<f32>(m5.yzw, n5.x);
        let v0 = dw_store(dw_row(l0, m0, r0, l1, m1, r1, l2, m2, r2, k0, k1, k2), s, b,
                          obase + q);
        if (stats && q == 0u) {
            shift = v0;
        }
        if (stats) {
            welford4_add(&wf, v0 - shift);
        }
        if (live > 1u) {
            let v = dw_store(dw_row(l1, m1, r1, l2, m2, r2, l3, m3, r3, k0, k1, k2), s, b,
                             obase + w4 + q);
            if (stats) {
                welford4_add(&wf, v - shift);
            }
        }
        if (live > 2u) {
            let v = dw_store(dw_row(l2, m2, r2, l3, m3, r3, l4, m4, r4, k0, k1, k2), s, b,
                             obase + 2u * w4 + q);
            if (stats) {
                welford4_add(&wf, v - shift);
            }
        }
        if (live > 3u) {
            let v = dw_store(dw_row(l3, m3, r3, l4, m4, r4, l5, m5, r5, k0, k1, k2), s, b,
                             obase + 3u * w4 + q);
            if (stats) {
                welford4_add(&wf, v - shift);
            }
        }
        p0 = m0.w;
        p1 = m1.w;
        p2 = m2.w;
        p3 = m3.w;
        p4 = m4.w;
        p5 = m5.w;
        m0 = n0;
        m1 = n1;
        m2 = n2;
        m3 = n3;
        m4 = n4;
        m5 = n5;
    }
    if (stats) {
        // Partial g of channel c: image n's row block, in the channel's value order.
        let parts = P.n * blocks;
        let g = (plane / P.c) * blocks + oy0 / DW_ROWS;
        let slot = stats_slot(c, g, P.c, parts);
        let tot = welford4_total(wf, shift);
        dw_stats[slot.x] = tot.x;
        dw_stats[slot.y] = tot.y;
        dw_stats[slot.z] = tot.z;
    }
}

fn input_grad(i: u32) -> f32 {
    let ix = i % P.w;
    var t = i / P.w;
    let iy = t % P.h;
    t = t / P.h;
    let c = t % P.c;
    let n = t / P.c;
    let g = c / P.cg;
    let ci = c % P.cg;
    let ohw = P.oh * P.ow;
    var acc = 0.0;
    for (var ky = 0u; ky < P.kh; ky = ky + 1u) {
        // oy * SH = iy + PH - ky * DH must be a non-negative multiple of SH below OH * SH.
        let ty = i32(iy + P.pad_h) - i32(ky * P.dil_h);
        if (ty < 0 || u32(ty) % P.stride_h != 0u) {
            continue;
        }
        let oy = u32(ty) / P.stride_h;
        if (oy >= P.oh) {
            continue;
        }
        for (var kx = 0u; kx < P.kw; kx = kx + 1u) {
            let tx = i32(ix + P.pad_w) - i32(kx * P.dil_w);
            if (tx < 0 || u32(tx) % P.stride_w != 0u) {
                continue;
            }
            let ox = u32(tx) / P.stride_w;
            if (ox >= P.ow) {
                continue;
            }
            let tap = ky * P.kw + kx;
            for (var oo = 0u; oo < P.og; oo = oo + 1u) {
                let oc = g * P.og + oo;
                acc = acc + dy[(n * P.o + oc) * ohw + oy * P.ow + ox]
                    * wt[(oc * P.cg + ci) * P.kh * P.kw + tap];
            }
        }
    }
    return acc;
}

@compute @workgroup_size(WG)
fn backward_input(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= P.count) {
        return;
    }
    out[i] = input_grad(i);
}

@compute @workgroup_size(WG)
fn transpose_forward(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= P.count) {
        return;
    }
    let c = (i / (P.h * P.w)) % P.c;
    out[i] = epilogue(input_grad(i), c);
}

// Tree reduction of `red` (RED partial sums) into red[0]; every invocation must call it.
fn reduce_red(li: u32, v: f32) -> f32 {
    red[li] = v;
    workgroupBarrier();
    for (var s = RED / 2u; s > 0u; s = s >> 1u) {
        if (li < s) {
            red[li] = red[li] + red[li + s];
        }
        workgroupBarrier();
    }
    return red[0];
}

@compute @workgroup_size(256)
fn backward_weight(@builtin(local_invocation_index) li: u32,
                   @builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = wid.x + wid.y * nwg.x;
    if (e >= P.count) {
        return;
    }
    let kx = e % P.kw;
    var t = e / P.kw;
    let ky = t % P.kh;
    t = t / P.kh;
    let ci = t % P.cg;
    let oc = t / P.cg;
    let g = oc / P.og;
    let ohw = P.oh * P.ow;
    let hw = P.h * P.w;
    let total = P.n * ohw;
    let dy_off = ky * P.dil_h;
    let dx_off = kx * P.dil_w;
    var acc = 0.0;
    for (var r = li; r < total; r = r + RED) {
        let n = r / ohw;
        let p = r % ohw;
        let iy = i32((p / P.ow) * P.stride_h + dy_off) - i32(P.pad_h);
        let ix = i32((p % P.ow) * P.stride_w + dx_off) - i32(P.pad_w);
        if (iy >= 0 && iy < i32(P.h) && ix >= 0 && ix < i32(P.w)) {
            acc = acc + dy[(n * P.o + oc) * ohw + p]
                * x[(n * P.c + g * P.cg + ci) * hw + u32(iy) * P.w + u32(ix)];
        }
    }
    let sum = reduce_red(li, acc);
    if (li == 0u) {
        out[e] = sum;
    }
}

@compute @workgroup_size(256)
fn channel_sum(@builtin(local_invocation_index) li: u32,
               @builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = wid.x + wid.y * nwg.x;
    if (c >= P.count) {
        return;
    }
    let hw = P.h * P.w;
    let total = P.n * hw;
    var acc = 0.0;
    for (var r = li; r < total; r = r + RED) {
        let n = r / hw;
        acc = acc + x[(n * P.c + c) * hw + r % hw];
    }
    let sum = reduce_red(li, acc);
    if (li == 0u) {
        out[c] = sum;
    }
}
