// conv2d_subgroup.wgsl: the register-blocked conv2d forward of conv2d.wgsl (`forward_reg`) with
// requires: lib/float_bits.wgsl
// requires: lib/activation.wgsl
// its weights shared through subgroup operations. Needs wgpu::Features::SUBGROUP (WGSL
// subgroup builtins), so it is a module of its own, compiled only on devices that have it
// (naga 30 takes the subgroup builtins without an `enable subgroups;` directive, which it does
// not parse yet). Same arithmetic contract as conv2d.wgsl's forward: NCHW input, OIHW weight,
// zero padding, stride, dilation, groups; f32 loads and accumulation; matches
// src/reference/conv2d.rs up to summation order.
//
//   y[n, o, oy, ox] = act(acc * out_scale[o] + bias[o]),
//   acc = sum over ci < CG, ky < KH, kx < KW of w[o, ci, ky, kx] *
//         x[n, g*CG + ci, oy*SH + ky*DH - PH, ox*SW + kx*DW - PW]   (g = o / OG, zero outside
//         the input); act as in activation.wgsl; out_scale / bias only when has_scale / has_bias.
//
// Bindings (group 0), a subset of conv2d.wgsl's with the same layout and Params:
//   @group(0) @binding(0) P:         uniform Params  (conv2d.wgsl's: geometry, ptiles, mtiles,
//                                    count, act, has_scale, has_bias, slope)
//   @group(0) @binding(1) x:         storage, read array<f32>  input [N, C, H, W]
//   @group(0) @binding(2) wt:        storage, read array<f32>  weight [O, CG, KH, KW]
//   @group(0) @binding(3) out:       storage, read_write array<f32>  y [N, O, OH, OW]
//   @group(0) @binding(4) out_scale: storage, read array<f32>  [O] (any buffer when has_scale = 0)
//   @group(0) @binding(5) bias:      storage, read array<f32>  [O] (any buffer when has_bias = 0)
//
// Entry points and dispatch shapes:
//   forward_sg: each invocation computes SG_O (8 or 16) output channels of one group x 8
//     consecutive output pixels of one output row (ox0 = 8 * block) in 2 * SG_O vec4
//     accumulators, as forward_reg does. Workgroup (SG_WG, 1, 1) over consecutive 8-pixel
//     blocks (row-major over n, oy, block); all invocations of a workgroup share the channel
//     block, hence every weight. count = mtiles * ptiles * groups workgroups,
//     mtiles = ceil(OG / SG_O), ptiles = ceil(N*OH*ceil(OW/8) / SG_WG), flat id =
//     wid.x + wid.y * nwg.x, decomposed as (channel block fastest, pixel tile, group); the grid
//     is tiled over x and y past 65,535 workgroups per dimension.
//     Weight sharing: per kernel tap (or per 3-tap row), subgroup lane l loads the weight of
//     channel m0 + (l & 7) (and m0 + 8 + (l & 7) when SG_O = 16) and every invocation takes
//     channel m's weight from lane m with subgroupBroadcast (constant lane ids 0..7): one
//     storage load per 8 channels instead of one per channel. This needs subgroup lanes 0..7
//     to be active, which the shader checks at run time (subgroup_size >= 8 and the ballot of
//     the live lanes covering lanes 0..7, both uniform over the subgroup); where they are not
//     (a subgroup size below 8, a partial subgroup) every invocation loads its own weights,
//     with the same results. So the result does not depend on the subgroup size.
//     Uniform control flow: the early exits are the workgroup-uniform one of workgroups past
//     `count` (grid padding) and the subgroup-uniform one of subgroups whose invocations are
//     all past the last pixel block (`subgroupAll`); other invocations past the last block stay,
//     compute on a clamped block and store nothing, so every subgroup operation runs with the
//     whole subgroup, and the branch between shared and own weights is uniform over the
//     subgroup. So the workgroup size (fixed per variant, SG_WG) may exceed the work at little
//     cost. Rows of the
//     input outside [0, H) are read as zeros (no divergent `continue`).
//     Override constants (chosen by the launcher, src/kernels/conv2d.rs):
//       SG_O  (8 or 16; default 16): output channels per invocation.
//       SG_K3 (0 / 1; default 0): 1 when KW == 3, stride_w == 1, dil_w == 1: one row of 10
//             inputs feeds all 3 taps of the 8 pixels.
//       SG_WG (default 64): invocations per workgroup.
//   forward_sg_r2: forward_sg for 3x3 kernels at stride 1 and dilation 1 in both dimensions
//     (the launcher runs it only then), each invocation computing SG_O channels x 8 pixels of
//     TWO output rows (oy = 2 * pair, oy + 1) in 4 * SG_O vec4 accumulators: per input channel
//     the 4 input rows iy0 .. iy0 + 3 (iy0 = oy - PH) are each loaded once (10 values) and
//     feed every (output row, kernel row) pair that reads them (row oy: kernel rows 0-2 from
//     input rows 0-2; row oy + 1: from input rows 1-3), and each broadcast weight row serves
//     both output rows: 40 input + 18 weight loads per channel for 2 rows instead of
//     2 x (30 + 18). Invocations run over consecutive 8-pixel blocks of row pairs (row-major
//     over n, oy / 2, block; ptiles = ceil(N*ceil(OH/2)*ceil(OW/8) / SG_WG)); the second row
//     of the last pair of an odd OH is computed on clamped rows and not stored. Weight sharing,
//     the any-subgroup-size fallback and the uniform control flow are those of forward_sg.
//     Same override constants (SG_K3 unused).
//   forward_sg_r4: forward_sg_r2 with four output rows per invocation (6 input rows loaded per
//     input channel for 4 output rows; 8 * SG_O vec4 accumulators); see its comment below.
//     The launcher picks it from OH >= 8 (faster there on lavapipe; slower at 7x7).
//     Why: on CPU adapters (lavapipe / llvmpipe) every storage load is a per-lane scalar loop
//     (about 10 fmas' worth per lane) while a broadcast is one extract and splat; loads set the
//     speed of forward_reg. Per 3-tap row, forward_reg does 10 input + 24 weight loads for
//     192 lane-fmas (8 channels); forward_sg with SG_O = 16 does 10 + 6 for 384.

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

// Output channels per invocation: 8 or 16.
override SG_O: u32 = 16u;
// 1: 3-tap rows at stride 1, dilation 1 (kw == 3, stride_w == 1, dil_w == 1).
override SG_K3: u32 = 0u;
// Invocations per workgroup.
override SG_WG: u32 = 64u;

fn epilogue(acc: f32, oc: u32) -> f32 {
    var v = acc;
    if (P.has_scale != 0u) {
        v = v * out_scale[oc];
    }
    if (P.has_bias != 0u) {
        v = v + bias[oc];
    }
    return act_apply(v, P.act, P.slope);
}

// x[xr + ix], or 0 when the row is outside the input (row_ok false) or column ix is outside
// [0, W) (no out-of-bounds read).
fn x_at(xr: u32, ix: i32, row_ok: bool) -> f32 {
    let ok = row_ok && ix >= 0 && ix < i32(P.w);
    return select(0.0, x[select(0u, xr + u32(ix), ok)], ok);
}

// Start of the weights of output channel gm of group g (clamped to the group's last channel:
// channels past it compute on a stand-in and are never stored).
fn w_base(g: u32, gm: u32) -> u32 {
    return (g * P.og + min(gm, P.og - 1u)) * P.k;
}

// Three consecutive weights from `base`.
fn w3(base: u32) -> vec3<f32> {
    return vec3<f32>(wt[base], wt[base + 1u], wt[base + 2u]);
}

// The 3-tap row update of one channel: lo/hi (pixels 0-3 / 4-7) += w.x * x[p] + w.y * x[p+1]
// + w.z * x[p+2], the input row given as its shifted vec4s.
fn tap3(lo: ptr<function, vec4<f32>>, hi: ptr<function, vec4<f32>>, w: vec3<f32>,
        l0: vec4<f32>, h0: vec4<f32>, l1: vec4<f32>, h1: vec4<f32>, l2: vec4<f32>,
        h2: vec4<f32>) {
    *lo = fma(vec4<f32>(w.z), l2, fma(vec4<f32>(w.y), l1, fma(vec4<f32>(w.x), l0, *lo)));
    *hi = fma(vec4<f32>(w.z), h2, fma(vec4<f32>(w.y), h1, fma(vec4<f32>(w.x), h0, *hi)));
}

// One tap of one channel: lo/hi += w * (l, h).
fn tap1(lo: ptr<function, vec4<f32>>, hi: ptr<function, vec4<f32>>, w: f32, l: vec4<f32>,
        h: vec4<f32>) {
    *lo = fma(vec4<f32>(w), l, *lo);
    *hi = fma(vec4<f32>(w), h, *hi);
}

// Stores channel gm's 8 pixels (ox0 .. ox0 + 7 of output row `row`), skipping those past OW,
// channels past the group and invocations past the last block (live false).
fn store_sg(lo: vec4<f32>, hi: vec4<f32>, g: u32, gm: u32, row: u32, ox0: u32, live: bool) {
    if (!live || gm >= P.og) {
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

@compute @workgroup_size(SG_WG)
fn forward_sg(@builtin(local_invocation_index) li: u32,
              @builtin(workgroup_id) wid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>,
              @builtin(subgroup_invocation_id) lane: u32,
              @builtin(subgroup_size) sg_size: u32) {
    let tile = wid.x + wid.y * nwg.x;
    // Grid padding: uniform over the whole workgroup, so no subgroup is split by it.
    if (tile >= P.count) {
        return;
    }
    let mt = tile % P.mtiles;
    let rest = tile / P.mtiles;
    let pt = rest % P.ptiles;
    let g = rest / P.ptiles;
    let owb = (P.ow + 7u) / 8u;
    let q = pt * SG_WG + li;
    let rows = P.n * P.oh;
    // Invocations past the last block compute on the last one and store nothing; a subgroup
    // with none live leaves (uniform over the subgroup, so no subgroup operation below runs
    // with part of one).
    let live = q / owb < rows;
    if (subgroupAll(!live)) {
        return;
    }
    let qc = select(rows * owb - 1u, q, live);
    let row = qc / owb;             // n * OH + oy
    let n = row / P.oh;
    let oy = row % P.oh;
    let ox0 = (qc % owb) * 8u;
    let m0 = mt * SG_O;
    let hw = P.h * P.w;
    let khw = P.kh * P.kw;
    let iy0 = i32(oy * P.stride_h) - i32(P.pad_h);
    let ix0 = i32(ox0 * P.stride_w) - i32(P.pad_w);
    let sw = i32(P.stride_w);
    let x_base = (n * P.c + g * P.cg) * hw;

    // Lanes 0..7 of this subgroup all active: then lane l loads for channels m0 + l (and
    // m0 + 8 + l) and the others take those weights by broadcast. Uniform over the subgroup.
    let ballot = subgroupBallot(true);
    let share = sg_size >= 8u && (ballot.x & 0xffu) == 0xffu;
    let own = lane & 7u;
    let wl0 = w_base(g, m0 + own);
    let wl1 = w_base(g, m0 + 8u + own);

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
    var a8 = vec4<f32>(0.0);
    var b8 = vec4<f32>(0.0);
    var a9 = vec4<f32>(0.0);
    var b9 = vec4<f32>(0.0);
    var a10 = vec4<f32>(0.0);
    var b10 = vec4<f32>(0.0);
    var a11 = vec4<f32>(0.0);
    var b11 = vec4<f32>(0.0);
    var a12 = vec4<f32>(0.0);
    var b12 = vec4<f32>(0.0);
    var a13 = vec4<f32>(0.0);
    var b13 = vec4<f32>(0.0);
    var a14 = vec4<f32>(0.0);
    var b14 = vec4<f32>(0.0);
    var a15 = vec4<f32>(0.0);
    var b15 = vec4<f32>(0.0);

    for (var ci = 0u; ci < P.cg; ci = ci + 1u) {
        let xc = x_base + ci * hw;
        let wc = ci * khw;
        for (var ky = 0u; ky < P.kh; ky = ky + 1u) {
            let iy = iy0 + i32(ky * P.dil_h);
            let row_ok = iy >= 0 && iy < i32(P.h);
            let xr = xc + u32(select(0, iy, row_ok)) * P.w;
            let wr = wc + ky * P.kw;
            if (SG_K3 == 1u) {
                // Weights of this kernel row for the channel block: w[m] = (kx 0, 1, 2).
                var w0: vec3<f32>;
                var w1: vec3<f32>;
                var w2: vec3<f32>;
                var w3v: vec3<f32>;
                var w4: vec3<f32>;
                var w5: vec3<f32>;
                var w6: vec3<f32>;
                var w7: vec3<f32>;
                var w8: vec3<f32>;
                var w9: vec3<f32>;
                var w10: vec3<f32>;
                var w11: vec3<f32>;
                var w12: vec3<f32>;
                var w13: vec3<f32>;
                var w14: vec3<f32>;
                var w15: vec3<f32>;
                if (share) {
                    let r = w3(wl0 + wr);
                    w0 = subgroupBroadcast(r, 0u);
                    w1 = subgroupBroadcast(r, 1u);
                    w2 = subgroupBroadcast(r, 2u);
                    w3v = subgroupBroadcast(r, 3u);
                    w4 = subgroupBroadcast(r, 4u);
                    w5 = subgroupBroadcast(r, 5u);
                    w6 = subgroupBroadcast(r, 6u);
                    w7 = subgroupBroadcast(r, 7u);
                    if (SG_O > 8u) {
                        let s = w3(wl1 + wr);
                        w8 = subgroupBroadcast(s, 0u);
                        w9 = subgroupBroadcast(s, 1u);
                        w10 = subgroupBroadcast(s, 2u);
                        w11 = subgroupBroadcast(s, 3u);
                        w12 = subgroupBroadcast(s, 4u);
                        w13 = subgroupBroadcast(s, 5u);
                        w14 = subgroupBroadcast(s, 6u);
                        w15 = subgroupBroadcast(s, 7u);
                    }
                } else {
                    w0 = w3(w_base(g, m0 + 0u) + wr);
                    w1 = w3(w_base(g, m0 + 1u) + wr);
                    w2 = w3(w_base(g, m0 + 2u) + wr);
                    w3v = w3(w_base(g, m0 + 3u) + wr);
                    w4 = w3(w_base(g, m0 + 4u) + wr);
                    w5 = w3(w_base(g, m0 + 5u) + wr);
                    w6 = w3(w_base(g, m0 + 6u) + wr);
                    w7 = w3(w_base(g, m0 + 7u) + wr);
                    if (SG_O > 8u) {
                        w8 = w3(w_base(g, m0 + 8u) + wr);
                        w9 = w3(w_base(g, m0 + 9u) + wr);
                        w10 = w3(w_base(g, m0 + 10u) + wr);
                        w11 = w3(w_base(g, m0 + 11u) + wr);
                        w12 = w3(w_base(g, m0 + 12u) + wr);
                        w13 = w3(w_base(g, m0 + 13u) + wr);
                        w14 = w3(w_base(g, m0 + 14u) + wr);
                        w15 = w3(w_base(g, m0 + 15u) + wr);
                    }
                }
                let x0 = x_at(xr, ix0 + 0, row_ok);
                let x1 = x_at(xr, ix0 + 1, row_ok);
                let x2 = x_at(xr, ix0 + 2, row_ok);
                let x3 = x_at(xr, ix0 + 3, row_ok);
                let x4 = x_at(xr, ix0 + 4, row_ok);
                let x5 = x_at(xr, ix0 + 5, row_ok);
                let x6 = x_at(xr, ix0 + 6, row_ok);
                let x7 = x_at(xr, ix0 + 7, row_ok);
                let x8 = x_at(xr, ix0 + 8, row_ok);
                let x9 = x_at(xr, ix0 + 9, row_ok);
                let l0 = vec4<f32>(x0, x1, x2, x3);
                let h0 = vec4<f32>(x4, x5, x6, x7);
                let l1 = vec4<f32>(x1, x2, x3, x4);
                let h1 = vec4<f32>(x5, x6, x7, x8);
                let l2 = vec4<f32>(x2, x3, x4, x5);
                let h2 = vec4<f32>(x6, x7, x8, x9);
                tap3(&a0, &b0, w0, l0, h0, l1, h1, l2, h2);
                tap3(&a1, &b1, w1, l0, h0, l1, h1, l2, h2);
                tap3(&a2, &b2, w2, l0, h0, l1, h1, l2, h2);
                tap3(&a3, &b3, w3v, l0, h0, l1, h1, l2, h2);
                tap3(&a4, &b4, w4, l0, h0, l1, h1, l2, h2);
                tap3(&a5, &b5, w5, l0, h0, l1, h1, l2, h2);
                tap3(&a6, &b6, w6, l0, h0, l1, h1, l2, h2);
                tap3(&a7, &b7, w7, l0, h0, l1, h1, l2, h2);
                if (SG_O > 8u) {
                    tap3(&a8, &b8, w8, l0, h0, l1, h1, l2, h2);
                    tap3(&a9, &b9, w9, l0, h0, l1, h1, l2, h2);
                    tap3(&a10, &b10, w10, l0, h0, l1, h1, l2, h2);
                    tap3(&a11, &b11, w11, l0, h0, l1, h1, l2, h2);
                    tap3(&a12, &b12, w12, l0, h0, l1, h1, l2, h2);
                    tap3(&a13, &b13, w13, l0, h0, l1, h1, l2, h2);
                    tap3(&a14, &b14, w14, l0, h0, l1, h1, l2, h2);
                    tap3(&a15, &b15, w15, l0, h0, l1, h1, l2, h2);
                }
            } else {
                for (var kx = 0u; kx < P.kw; kx = kx + 1u) {
                    let wk = wr + kx;
                    var w = array<f32, 16>();
                    if (share) {
                        let r = wt[wl0 + wk];
                        w[0] = subgroupBroadcast(r, 0u);
                        w[1] = subgroupBroadcast(r, 1u);
                        w[2] = subgroupBroadcast(r, 2u);
                        w[3] = subgroupBroadcast(r, 3u);
                        w[4] = subgroupBroadcast(r, 4u);
                        w[5] = subgroupBroadcast(r, 5u);
                        w[6] = subgroupBroadcast(r, 6u);
                        w[7] = subgroupBroadcast(r, 7u);
                        if (SG_O > 8u) {
                            let s = wt[wl1 + wk];
                            w[8] = subgroupBroadcast(s, 0u);
                            w[9] = subgroupBroadcast(s, 1u);
                            w[10] = subgroupBroadcast(s, 2u);
                            w[11] = subgroupBroadcast(s, 3u);
                            w[12] = subgroupBroadcast(s, 4u);
                            w[13] = subgroupBroadcast(s, 5u);
                            w[14] = subgroupBroadcast(s, 6u);
                            w[15] = subgroupBroadcast(s, 7u);
                        }
                    } else {
                        w[0] = wt[w_base(g, m0 + 0u) + wk];
                        w[1] = wt[w_base(g, m0 + 1u) + wk];
                        w[2] = wt[w_base(g, m0 + 2u) + wk];
                        w[3] = wt[w_base(g, m0 + 3u) + wk];
                        w[4] = wt[w_base(g, m0 + 4u) + wk];
                        w[5] = wt[w_base(g, m0 + 5u) + wk];
                        w[6] = wt[w_base(g, m0 + 6u) + wk];
                        w[7] = wt[w_base(g, m0 + 7u) + wk];
                        if (SG_O > 8u) {
                            w[8] = wt[w_base(g, m0 + 8u) + wk];
                            w[9] = wt[w_base(g, m0 + 9u) + wk];
                            w[10] = wt[w_base(g, m0 + 10u) + wk];
                            w[11] = wt[w_base(g, m0 + 11u) + wk];
                            w[12] = wt[w_base(g, m0 + 12u) + wk];
                            w[13] = wt[w_base(g, m0 + 13u) + wk];
                            w[14] = wt[w_base(g, m0 + 14u) + wk];
                            w[15] = wt[w_base(g, m0 + 15u) + wk];
                        }
                    }
                    let ix = ix0 + i32(kx * P.dil_w);
                    let l = vec4<f32>(x_at(xr, ix, row_ok), x_at(xr, ix + sw, row_ok),
                                      x_at(xr, ix + 2 * sw, row_ok), x_at(xr, ix + 3 * sw, row_ok));
                    let h = vec4<f32>(x_at(xr, ix + 4 * sw, row_ok), x_at(xr, ix + 5 * sw, row_ok),
                                      x_at(xr, ix + 6 * sw, row_ok), x_at(xr, ix + 7 * sw, row_ok));
                    tap1(&a0, &b0, w[0], l, h);
                    tap1(&a1, &b1, w[1], l, h);
                    tap1(&a2, &b2, w[2], l, h);
                    tap1(&a3, &b3, w[3], l, h);
                    tap1(&a4, &b4, w[4], l, h);
                    tap1(&a5, &b5, w[5], l, h);
                    tap1(&a6, &b6, w[6], l, h);
                    tap1(&a7, &b7, w[7], l, h);
                    if (SG_O > 8u) {
                        tap1(&a8, &b8, w[8], l, h);
                        tap1(&a9, &b9, w[9], l, h);
                        tap1(&a10, &b10, w[10], l, h);
                        tap1(&a11, &b11, w[11], l, h);
                        tap1(&a12, &b12, w[12], l, h);
                        tap1(&a13, &b13, w[13], l, h);
                        tap1(&a14, &b14, w[14], l, h);
                        tap1(&a15, &b15, w[15], l, h);
                    }
                }
            }
        }
    }
    store_sg(a0, b0, g, m0 + 0u, row, ox0, live);
    store_sg(a1, b1, g, m0 + 1u, row, ox0, live);
    store_sg(a2, b2, g, m0 + 2u, row, ox0, live);
    store_sg(a3, b3, g, m0 + 3u, row, ox0, live);
    store_sg(a4, b4, g, m0 + 4u, row, ox0, live);
    store_sg(a5, b5, g, m0 + 5u, row, ox0, live);
    store_sg(a6, b6, g, m0 + 6u, row, ox0, live);
    store_sg(a7, b7, g, m0 + 7u, row, ox0, live);
    if (SG_O > 8u) {
        store_sg(a8, b8, g, m0 + 8u, row, ox0, live);
        store_sg(a9, b9, g, m0 + 9u, row, ox0, live);
        store_sg(a10, b10, g, m0 + 10u, row, ox0, live);
        store_sg(a11, b11, g, m0 + 11u, row, ox0, live);
        store_sg(a12, b12, g, m0 + 12u, row, ox0, live);
        store_sg(a13, b13, g, m0 + 13u, row, ox0, live);
        store_sg(a14, b14, g, m0 + 14u, row, ox0, live);
        store_sg(a15, b15, g, m0 + 15u, row, ox0, live);
    }
}

// ---------------------------------------------------------------------------------------------
// forward_sg_r2: forward_sg for 3x3 kernels at stride 1, dilation 1 (both dimensions), two
// output rows per invocation: the four input rows iy0 .. iy0 + 3 feed output rows oy and oy + 1,
// so each loaded input row serves every kernel row that needs it (4 row loads per input channel
// instead of 6), and each broadcast weight row serves both output rows. See the header.

// The 3-tap weights (kx 0, 1, 2) of kernel row `off` (offset within a channel's weights) for
// the SG_O channels m0 .. m0 + SG_O - 1 of group g: lane l loads channel m0 + (l & 7)'s (and
// m0 + 8 + (l & 7)'s) and the others take them by broadcast when `share` (uniform over the
// subgroup); otherwise every invocation loads all of them. Entries past SG_O are zero.
fn w_rows3(share: bool, wl0: u32, wl1: u32, g: u32, m0: u32, off: u32) -> array<vec3<f32>, 16> {
    var w = array<vec3<f32>, 16>();
    if (share) {
        let r = w3(wl0 + off);
        w[0] = subgroupBroadcast(r, 0u);
        w[1] = subgroupBroadcast(r, 1u);
        w[2] = subgroupBroadcast(r, 2u);
        w[3] = subgroupBroadcast(r, 3u);
        w[4] = subgroupBroadcast(r, 4u);
        w[5] = subgroupBroadcast(r, 5u);
        w[6] = subgroupBroadcast(r, 6u);
        w[7] = subgroupBroadcast(r, 7u);
        if (SG_O > 8u) {
            let s = w3(wl1 + off);
            w[8] = subgroupBroadcast(s, 0u);
            w[9] = subgroupBroadcast(s, 1u);
            w[10] = subgroupBroadcast(s, 2u);
            w[11] = subgroupBroadcast(s, 3u);
            w[12] = subgroupBroadcast(s, 4u);
            w[13] = subgroupBroadcast(s, 5u);
            w[14] = subgroupBroadcast(s, 6u);
            w[15] = subgroupBroadcast(s, 7u);
        }
    } else {
        w[0] = w3(w_base(g, m0 + 0u) + off);
        w[1] = w3(w_base(g, m0 + 1u) + off);
        w[2] = w3(w_base(g, m0 + 2u) + off);
        w[3] = w3(w_base(g, m0 + 3u) + off);
        w[4] = w3(w_base(g, m0 + 4u) + off);
        w[5] = w3(w_base(g, m0 + 5u) + off);
        w[6] = w3(w_base(g, m0 + 6u) + off);
        w[7] = w3(w_base(g, m0 + 7u) + off);
        if (SG_O > 8u) {
            w[8] = w3(w_base(g, m0 + 8u) + off);
            w[9] = w3(w_base(g, m0 + 9u) + off);
            w[10] = w3(w_base(g, m0 + 10u) + off);
            w[11] = w3(w_base(g, m0 + 11u) + off);
            w[12] = w3(w_base(g, m0 + 12u) + off);
            w[13] = w3(w_base(g, m0 + 13u) + off);
            w[14] = w3(w_base(g, m0 + 14u) + off);
            w[15] = w3(w_base(g, m0 + 15u) + off);
        }
    }
    return w;
}

// The input row at xr (zeros when !row_ok) as the six shifted vec4s of the 3-tap update:
// (l0, h0, l1, h1, l2, h2), lk / hk = x[ix0 + k .. ix0 + k + 3] / x[ix0 + 4 + k .. ix0 + k + 7].
fn x_row3(xr: u32, ix0: i32, row_ok: bool) -> array<vec4<f32>, 6> {
    let x0 = x_at(xr, ix0 + 0, row_ok);
    let x1 = x_at(xr, ix0 + 1, row_ok);
    let x2 = x_at(xr, ix0 + 2, row_ok);
    let x3 = x_at(xr, ix0 + 3, row_ok);
    let x4 = x_at(xr, ix0 + 4, row_ok);
    let x5 = x_at(xr, ix0 + 5, row_ok);
    let x6 = x_at(xr, ix0 + 6, row_ok);
    let x7 = x_at(xr, ix0 + 7, row_ok);
    let x8 = x_at(xr, ix0 + 8, row_ok);
    let x9 = x_at(xr, ix0 + 9, row_ok);
    return array<vec4<f32>, 6>(vec4<f32>(x0, x1, x2, x3), vec4<f32>(x4, x5, x6, x7),
                               vec4<f32>(x1, x2, x3, x4), vec4<f32>(x5, x6, x7, x8),
                               vec4<f32>(x2, x3, x4, x5), vec4<f32>(x6, x7, x8, x9));
}

// a + w.x * l0 + w.y * l1 + w.z * l2 (one half of tap3).
fn t3(a: vec4<f32>, w: vec3<f32>, l0: vec4<f32>, l1: vec4<f32>, l2: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(w.z), l2, fma(vec4<f32>(w.y), l1, fma(vec4<f32>(w.x), l0, a)));
}

// acc[2m] / acc[2m + 1] (pixels 0-3 / 4-7 of channel m0 + m) += the 3-tap row update with
// weights w[m] and input row xs, for m < SG_O.
fn rows3_update(acc: ptr<function, array<vec4<f32>, 32>>, w: array<vec3<f32>, 16>,
                xs: array<vec4<f32>, 6>) {
    (*acc)[0] = t3((*acc)[0], w[0], xs[0], xs[2], xs[4]);
    (*acc)[1] = t3((*acc)[1], w[0], xs[1], xs[3], xs[5]);
    (*acc)[2] = t3((*acc)[2], w[1], xs[0], xs[2], xs[4]);
    (*acc)[3] = t3((*acc)[3], w[1], xs[1], xs[3], xs[5]);
    (*acc)[4] = t3((*acc)[4], w[2], xs[0], xs[2], xs[4]);
    (*acc)[5] = t3((*acc)[5], w[2], xs[1], xs[3], xs[5]);
    (*acc)[6] = t3((*acc)[6], w[3], xs[0], xs[2], xs[4]);
    (*acc)[7] = t3((*acc)[7], w[3], xs[1], xs[3], xs[5]);
    (*acc)[8] = t3((*acc)[8], w[4], xs[0], xs[2], xs[4]);
    (*acc)[9] = t3((*acc)[9], w[4], xs[1], xs[3], xs[5]);
    (*acc)[10] = t3((*acc)[10], w[5], xs[0], xs[2], xs[4]);
    (*acc)[11] = t3((*acc)[11], w[5], xs[1], xs[3], xs[5]);
    (*acc)[12] = t3((*acc)[12], w[6], xs[0], xs[2], xs[4]);
    (*acc)[13] = t3((*acc)[13], w[6], xs[1], xs[3], xs[5]);
    (*acc)[14] = t3((*acc)[14], w[7], xs[0], xs[2], xs[4]);
    (*acc)[15] = t3((*acc)[15], w[7], xs[1], xs[3], xs[5]);
    if (SG_O > 8u) {
        (*acc)[16] = t3((*acc)[16], w[8], xs[0], xs[2], xs[4]);
        (*acc)[17] = t3((*acc)[17], w[8], xs[1], xs[3], xs[5]);
        (*acc)[18] = t3((*acc)[18], w[9], xs[0], xs[2], xs[4]);
        (*acc)[19] = t3((*acc)[19], w[9], xs[1], xs[3], xs[5]);
        (*acc)[20] = t3((*acc)[20], w[10], xs[0], xs[2], xs[4]);
        (*acc)[21] = t3((*acc)[21], w[10], xs[1], xs[3], xs[5]);
        (*acc)[22] = t3((*acc)[22], w[11], xs[0], xs[2], xs[4]);
        (*acc)[23] = t3((*acc)[23], w[11], xs[1], xs[3], xs[5]);
        (*acc)[24] = t3((*acc)[24], w[12], xs[0], xs[2], xs[4]);
        (*acc)[25] = t3((*acc)[25], w[12], xs[1], xs[3], xs[5]);
        (*acc)[26] = t3((*acc)[26], w[13], xs[0], xs[2], xs[4]);
        (*acc)[27] = t3((*acc)[27], w[13], xs[1], xs[3], xs[5]);
        (*acc)[28] = t3((*acc)[28], w[14], xs[0], xs[2], xs[4]);
        (*acc)[29] = t3((*acc)[29], w[14], xs[1], xs[3], xs[5]);
        (*acc)[30] = t3((*acc)[30], w[15], xs[0], xs[2], xs[4]);
        (*acc)[31] = t3((*acc)[31], w[15], xs[1], xs[3], xs[5]);
    }
}

// Stores the SG_O channels of one output row (see store_sg).
fn store_rows3(acc: ptr<function, array<vec4<f32>, 32>>, g: u32, m0: u32, row: u32, ox0: u32,
               live: bool) {
    store_sg((*acc)[0], (*acc)[1], g, m0 + 0u, row, ox0, live);
    store_sg((*acc)[2], (*acc)[3], g, m0 + 1u, row, ox0, live);
    store_sg((*acc)[4], (*acc)[5], g, m0 + 2u, row, ox0, live);
    store_sg((*acc)[6], (*acc)[7], g, m0 + 3u, row, ox0, live);
    store_sg((*acc)[8], (*acc)[9], g, m0 + 4u, row, ox0, live);
    store_sg((*acc)[10], (*acc)[11], g, m0 + 5u, row, ox0, live);
    store_sg((*acc)[12], (*acc)[13], g, m0 + 6u, row, ox0, live);
    store_sg((*acc)[14], (*acc)[15], g, m0 + 7u, row, ox0, live);
    if (SG_O > 8u) {
        store_sg((*acc)[16], (*acc)[17], g, m0 + 8u, row, ox0, live);
        store_sg((*acc)[18], (*acc)[19], g, m0 + 9u, row, ox0, live);
        store_sg((*acc)[20], (*acc)[21], g, m0 + 10u, row, ox0, live);
        store_sg((*acc)[22], (*acc)[23], g, m0 + 11u, row, ox0, live);
        store_sg((*acc)[24], (*acc)[25], g, m0 + 12u, row, ox0, live);
        store_sg((*acc)[26], (*acc)[27], g, m0 + 13u, row, ox0, live);
        store_sg((*acc)[28], (*acc)[29], g, m0 + 14u, row, ox0, live);
        store_sg((*acc)[30], (*acc)[31], g, m0 + 15u, row, ox0, live);
    }
}

@compute @workgroup_size(SG_WG)
fn forward_sg_r2(@builtin(local_invocation_index) li: u32,
                 @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(subgroup_invocation_id) lane: u32,
                 @builtin(subgroup_size) sg_size: u32) {
    let tile = wid.x + wid.y * nwg.x;
    // Grid padding: uniform over the whole workgroup, so no subgroup is split by it.
    if (tile >= P.count) {
        return;
    }
    let mt = tile % P.mtiles;
    let rest = tile / P.mtiles;
    let pt = rest % P.ptiles;
    let g = rest / P.ptiles;
    let owb = (P.ow + 7u) / 8u;
    let ohp = (P.oh + 1u) / 2u;
    let q = pt * SG_WG + li;
    let pairs = P.n * ohp;
    // Invocations past the last block compute on the last one and store nothing; a subgroup
    // with none live leaves (as in forward_sg).
    let live = q / owb < pairs;
    if (subgroupAll(!live)) {
        return;
    }
    let qc = select(pairs * owb - 1u, q, live);
    let pair = qc / owb;            // n * ceil(OH / 2) + oy / 2
    let n = pair / ohp;
    let oy = (pair % ohp) * 2u;
    // The second row of the pair exists unless OH is odd and this is the last pair.
    let live1 = live && oy + 1u < P.oh;
    let row = n * P.oh + oy;
    let ox0 = (qc % owb) * 8u;
    let m0 = mt * SG_O;
    let hw = P.h * P.w;
    let iy0 = i32(oy) - i32(P.pad_h);
    let ix0 = i32(ox0) - i32(P.pad_w);
    let x_base = (n * P.c + g * P.cg) * hw;

    // As in forward_sg: lanes 0..7 all active, uniform over the subgroup.
    let ballot = subgroupBallot(true);
    let share = sg_size >= 8u && (ballot.x & 0xffu) == 0xffu;
    let own = lane & 7u;
    let wl0 = w_base(g, m0 + own);
    let wl1 = w_base(g, m0 + 8u + own);

    var acc0 = array<vec4<f32>, 32>();
    var acc1 = array<vec4<f32>, 32>();
    // Input rows iy0 + t, t = 0..3, clamped into [0, H) (read as zeros when outside).
    let ok0 = iy0 >= 0 && iy0 < i32(P.h);
    let ok1 = iy0 + 1 >= 0 && iy0 + 1 < i32(P.h);
    let ok2 = iy0 + 2 >= 0 && iy0 + 2 < i32(P.h);
    let ok3 = iy0 + 3 >= 0 && iy0 + 3 < i32(P.h);
    let r0 = u32(select(0, iy0, ok0)) * P.w;
    let r1 = u32(select(0, iy0 + 1, ok1)) * P.w;
    let r2 = u32(select(0, iy0 + 2, ok2)) * P.w;
    let r3 = u32(select(0, iy0 + 3, ok3)) * P.w;
    for (var ci = 0u; ci < P.cg; ci = ci + 1u) {
        let xc = x_base + ci * hw;
        let wc = ci * 9u;
        // Output row oy takes kernel row t from input row t; row oy + 1 kernel row t - 1.
        let w0 = w_rows3(share, wl0, wl1, g, m0, wc);
        let x0 = x_row3(xc + r0, ix0, ok0);
        rows3_update(&acc0, w0, x0);
        let w1 = w_rows3(share, wl0, wl1, g, m0, wc + 3u);
        let x1 = x_row3(xc + r1, ix0, ok1);
        rows3_update(&acc0, w1, x1);
        rows3_update(&acc1, w0, x1);
        let w2 = w_rows3(share, wl0, wl1, g, m0, wc + 6u);
        let x2 = x_row3(xc + r2, ix0, ok2);
        rows3_update(&acc0, w2, x2);
        rows3_update(&acc1, w1, x2);
        let x3 = x_row3(xc + r3, ix0, ok3);
        rows3_update(&acc1, w2, x3);
    }
    store_rows3(&acc0, g, m0, row, ox0, live);
    store_rows3(&acc1, g, m0, row + 1u, ox0, live1);
}

// ---------------------------------------------------------------------------------------------
// forward_sg_r4: forward_sg_r2 with FOUR output rows per invocation (oy = 4 * quad .. oy + 3):
// the six input rows iy0 .. iy0 + 5 are each loaded once per input channel and feed every
// (output row, kernel row) pair that reads them (output row r: kernel row t from input row
// r + t), and each broadcast weight row serves all four output rows: 60 input + 18 weight loads
// per channel for 4 rows instead of 2 x (40 + 18). Invocations run over consecutive 8-pixel
// blocks of row quads (row-major over n, oy / 4, block; ptiles = ceil(N*ceil(OH/4)*ceil(OW/8) /
// SG_WG)); rows of the last quad past OH are computed on clamped (zero) input rows and not
// stored. Weight sharing, the any-subgroup-size fallback and the uniform control flow are those
// of forward_sg. Same override constants (SG_K3 unused).
@compute @workgroup_size(SG_WG)
fn forward_sg_r4(@builtin(local_invocation_index) li: u32,
                 @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(subgroup_invocation_id) lane: u32,
                 @builtin(subgroup_size) sg_size: u32) {
    let tile = wid.x + wid.y * nwg.x;
    // Grid padding: uniform over the whole workgroup, so no subgroup is split by it.
    if (tile >= P.count) {
        return;
    }
    let mt = tile % P.mtiles;
    let rest = tile / P.mtiles;
    let pt = rest % P.ptiles;
    let g = rest / P.ptiles;
    let owb = (P.ow + 7u) / 8u;
    let ohq = (P.oh + 3u) / 4u;
    let q = pt * SG_WG + li;
    let quads = P.n * ohq;
    // Invocations past the last block compute on the last one and store nothing; a subgroup
    // with none live leaves (as in forward_sg).
    let live = q / owb < quads;
    if (subgroupAll(!live)) {
        return;
    }
    let qc = select(quads * owb - 1u, q, live);
    let quad = qc / owb;            // n * ceil(OH / 4) + oy / 4
    let n = quad / ohq;
    let oy = (quad % ohq) * 4u;
    // Rows oy + 1 .. oy + 3 exist unless OH is not a multiple of 4 and this is the last quad.
    let live1 = live && oy + 1u < P.oh;
    let live2 = live && oy + 2u < P.oh;
    let live3 = live && oy + 3u < P.oh;
    let row = n * P.oh + oy;
    let ox0 = (qc % owb) * 8u;
    let m0 = mt * SG_O;
    let hw = P.h * P.w;
    let iy0 = i32(oy) - i32(P.pad_h);
    let ix0 = i32(ox0) - i32(P.pad_w);
    let x_base = (n * P.c + g * P.cg) * hw;

    // As in forward_sg: lanes 0..7 all active, uniform over the subgroup.
    let ballot = subgroupBallot(true);
    let share = sg_size >= 8u && (ballot.x & 0xffu) == 0xffu;
    let own = lane & 7u;
    let wl0 = w_base(g, m0 + own);
    let wl1 = w_base(g, m0 + 8u + own);

    var acc0 = array<vec4<f32>, 32>();
    var acc1 = array<vec4<f32>, 32>();
    var acc2 = array<vec4<f32>, 32>();
    var acc3 = array<vec4<f32>, 32>();
    // Input rows iy0 + t, t = 0..5, clamped into [0, H) (read as zeros when outside).
    let ok0 = iy0 >= 0 && iy0 < i32(P.h);
    let ok1 = iy0 + 1 >= 0 && iy0 + 1 < i32(P.h);
    let ok2 = iy0 + 2 >= 0 && iy0 + 2 < i32(P.h);
    let ok3 = iy0 + 3 >= 0 && iy0 + 3 < i32(P.h);
    let ok4 = iy0 + 4 >= 0 && iy0 + 4 < i32(P.h);
    let ok5 = iy0 + 5 >= 0 && iy0 + 5 < i32(P.h);
    let r0 = u32(select(0, iy0, ok0)) * P.w;
    let r1 = u32(select(0, iy0 + 1, ok1)) * P.w;
    let r2 = u32(select(0, iy0 + 2, ok2)) * P.w;
    let r3 = u32(select(0, iy0 + 3, ok3)) * P.w;
    let r4 = u32(select(0, iy0 + 4, ok4)) * P.w;
    let r5 = u32(select(0, iy0 + 5, ok5)) * P.w;
    for (var ci = 0u; ci < P.cg; ci = ci + 1u) {
        let xc = x_base + ci * hw;
        let wc = ci * 9u;
        // Output row oy + r takes kernel row t from input row r + t.
        let w0 = w_rows3(share, wl0, wl1, g, m0, wc);
        let w1 = w_rows3(share, wl0, wl1, g, m0, wc + 3u);
        let w2 = w_rows3(share, wl0, wl1, g, m0, wc + 6u);
        let x0 = x_row3(xc + r0, ix0, ok0);
        rows3_update(&acc0, w0, x0);
        let x1 = x_row3(xc + r1, ix0, ok1);
        rows3_update(&acc0, w1, x1);
        rows3_update(&acc1, w0, x1);
        let x2 = x_row3(xc + r2, ix0, ok2);
        rows3_update(&acc0, w2, x2);
        rows3_update(&acc1, w1, x2);
        rows3_update(&acc2, w0, x2);
        let x3 = x_row3(xc + r3, ix0, ok3);
        rows3_update(&acc1, w2, x3);
        rows3_update(&acc2, w1, x3);
        rows3_update(&acc3, w0, x3);
        let x4 = x_row3(xc + r4, ix0, ok4);
        rows3_update(&acc2, w2, x4);
        rows3_update(&acc3, w1, x4);
        let x5 = x_row3(xc + r5, ix0, ok5);
        rows3_update(&acc3, w2, x5);
    }
    store_rows3(&acc0, g, m0, row, ox0, live);
    store_rows3(&acc1, g, m0, row + 1u, ox0, live1);
    store_rows3(&acc2, g, m0, row + 2u, ox0, live2);
    store_rows3(&acc3, g, m0, row + 3u, ox0, live3);
}
