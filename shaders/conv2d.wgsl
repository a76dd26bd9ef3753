// conv2d.wgsl: 2-D convolution (NCHW input, OIHW weight, zero padding, stride, dilation,
// requires: lib/float_bits.wgsl
// requires: lib/activation.wgsl
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
//                                    act; has_scale, has_bias; slope (LeakyReLU)
//   @group(0) @binding(1) x:         storage, read array<f32>  input [N, C, H, W] (channel_sum:
//                                    the tensor summed)
//   @group(0) @binding(2) wt:        storage, read array<f32>  weight [O, CG, KH, KW]
//   @group(0) @binding(3) out:       storage, read_write array<f32>  y / dx / dw / channel sums
//   @group(0) @binding(4) out_scale: storage, read array<f32>  [O] epilogue multiplier (any
//                                    buffer when has_scale = 0)
//   @group(0) @binding(5) bias:      storage, read array<f32>  [O] epilogue bias (any buffer when
//                                    has_bias = 0)
//   @group(0) @binding(6) dy:        storage, read array<f32>  upstream gradient [N, O, OH, OW]
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
    _pad1: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> wt: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> out_scale: array<f32>;
@group(0) @binding(5) var<storage, read> bias: array<f32>;
@group(0) @binding(6) var<storage, read> dy: array<f32>;

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

// The gather of backward_input for flat dx index i (also transpose_forward's accumulator).
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
