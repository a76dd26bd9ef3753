// matmul_sg.wgsl: the training matmuls of src/kernels/train.rs (linear backward, the conv input
// gradient's column matrix, the conv weight gradient) with the rows of A shared through
// subgroup operations. Needs wgpu::Features::SUBGROUP, so it is a module of its own, compiled
// only on devices that have it (others keep train.wgsl's `matmul` and the conv kernels).
// requires: lib/float_bits.wgsl
// requires: lib/activation.wgsl
// f32 loads, fma accumulation in k order; matches src/reference/train.rs and
// src/reference/conv2d.rs (conv2d_backward) up to summation order.
//
//   matmul_sg: out[bt, m, n] = act(sum over ko < kout, k < kin of
//       a[bt*a_bs + m*a_rs + ko*a_ko + k*a_cs] * b[bt*b_bs + n*b_cs + ko*b_ko + k*b_rs]
//       + bias), stored at out[bt*rows*cols + m*cols + n]; bias: none (bias_mode 0), bias[n]
//       (1) or bias[m] (2); act as in lib/activation.wgsl (code `act`, `slope`). The two-level
//       k (kout blocks of kin) lets a reduction run over a batch and a plane at once.
//   conv_wgrad_sg: the weight gradient of a conv2d (groups 1) as an implicit GEMM:
//       out[o, (c*KH + ky)*KW + kx] = sum over n < N, oy < OH, ox < OW of dy[n, o, oy, ox] *
//       x[n, c, oy*SH + ky*DH - PH, ox*SW + kx*DW - PW] (zero outside the input), so
//       rows = O, cols = C*KH*KW, out is the OIHW weight gradient.
//   conv_wgrad3_sg2 / conv_wgrad3_sg4: conv_wgrad_sg for 3x3 kernels at stride 1 and dilation
//       1 along the width, 16 rows x 2 input channels x 9 taps per invocation over a sliding
//       window, 2 or 4 output columns per step (see their comment below).
//   col2im: the input gradient of a stride-1, undilated conv2d (groups 1) from the column
//       matrix col [N, C*KH*KW, OH*OW] (= W^T * dy per image, from matmul_sg):
//       dx[n, c, iy, ix] = sum over ky < KH, kx < KW (row-major) with oy = iy + PH - ky in
//       [0, OH) and ox = ix + PW - kx in [0, OW) of col[n, (c*KH + ky)*KW + kx, oy*OW + ox].
//
// Bindings (group 0):
//   @group(0) @binding(0) P:    uniform Params (below)
//   @group(0) @binding(1) a:    storage, read array<f32>  A (matmul_sg) / dy (conv_wgrad_sg) /
//                               col (col2im)
//   @group(0) @binding(2) b:    storage, read array<f32>  B (matmul_sg) / x (conv_wgrad_sg);
//                               unused by col2im (any buffer)
//   @group(0) @binding(3) out:  storage, read_write array<f32>  the result
//   @group(0) @binding(4) bias: storage, read array<f32>  bias (matmul_sg; any buffer when
//                               bias_mode = 0)
//
// Entry points and dispatch shapes:
//   matmul_sg, conv_wgrad_sg: each invocation computes 16 rows (m0 .. m0 + 15) x 4 consecutive
//     columns (n0 = 4 * (ct * MM_WG + li)) in 16 vec4 accumulators. Workgroup (MM_WG, 1, 1);
//     all invocations of a workgroup share the row block. count = batch * mtiles * ctiles
//     workgroups, mtiles = ceil(rows / 16), ctiles = ceil(cols / (4 * MM_WG)); flat id
//     wid.x + wid.y * nwg.x decomposed as (column tile fastest, row tile, batch); the grid is
//     tiled over x and y past 65,535 workgroups per dimension.
//     Row sharing: per k, subgroup lane l loads A's rows m0 + (l & 7) and m0 + 8 + (l & 7)
//     and every invocation takes row r from lane r & 7 with subgroupBroadcast (constant lane
//     ids): 2 loads of A and 4 of B per 64 fmas. This needs lanes 0..7 active, checked at run
//     time (subgroup_size >= 8 and a ballot covering lanes 0..7, uniform over the subgroup);
//     otherwise every invocation loads its own rows, with the same results. Uniform control
//     flow: the only early exit is the workgroup-uniform one past `count`; rows and columns
//     past the matrix are computed on clamped indices and not stored.
//     Why: on lavapipe every storage load is a per-lane loop (about ten fmas' worth per lane)
//     and a broadcast one extract and splat; loads set the speed.
//     Override constants: MM_WG (default 64): invocations per workgroup; MM_INSIDE (0 / 1,
//     default 0): 1 when conv_wgrad_sg's conv has no padding, so every tap is inside the
//     input and the bounds tests are left out.
//   col2im: one invocation per element of dx, workgroup (MM_WG, 1, 1), count = N*C*H*W;
//     1-D grid tiled over x and y, flat index gid.x + gid.y * nwg.x * MM_WG.

struct Params {
    rows: u32,
    cols: u32,
    kin: u32,
    kout: u32,
    a_bs: u32,
    a_rs: u32,
    a_cs: u32,
    a_ko: u32,
    b_bs: u32,
    b_rs: u32,
    b_cs: u32,
    b_ko: u32,
    mtiles: u32,
    ctiles: u32,
    count: u32,
    bias_mode: u32,
    act: u32,
    slope: f32,
    // Conv geometry (conv_wgrad_sg, col2im).
    c: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    ph: u32,
    pw: u32,
    dh: u32,
    dw: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> bias: array<f32>;

override MM_WG: u32 = 64u;
// 1 when every tap of conv_wgrad_sg is inside the input (no padding): no bounds tests.
override MM_INSIDE: u32 = 0u;

struct Tile {
    bt: u32,
    m0: u32,
    n0: u32,
    live: bool,
}

// The tile of workgroup `wid` and invocation `li`, or live = false past `count`.
fn tile_of(li: u32, wid: vec3<u32>, nwg: vec3<u32>) -> Tile {
    var t: Tile;
    let id = wid.x + wid.y * nwg.x;
    t.live = id < P.count;
    let ct = id % P.ctiles;
    let rest = id / P.ctiles;
    t.m0 = (rest % P.mtiles) * 16u;
    t.bt = rest / P.mtiles;
    t.n0 = (ct * MM_WG + li) * 4u;
    return t;
}

fn epilogue(v: f32, m: u32, n: u32) -> f32 {
    var y = v;
    if (P.bias_mode == 1u) {
        y = y + bias[n];
    } else if (P.bias_mode == 2u) {
        y = y + bias[m];
    }
    return act_apply(y, P.act, P.slope);
}

// Stores row m0 + r of the tile (rows and columns past the matrix skipped), with the epilogue.
fn store_row(v: vec4<f32>, t: Tile, r: u32) {
    let m = t.m0 + r;
    if (m >= P.rows) {
        return;
    }
    let base = t.bt * P.rows * P.cols + m * P.cols + t.n0;
    let n = t.n0;
    if (n < P.cols) {
        out[base] = epilogue(v.x, m, n);
    }
    if (n + 1u < P.cols) {
        out[base + 1u] = epilogue(v.y, m, n + 1u);
    }
    if (n + 2u < P.cols) {
        out[base + 2u] = epilogue(v.z, m, n + 2u);
    }
    if (n + 3u < P.cols) {
        out[base + 3u] = epilogue(v.w, m, n + 3u);
    }
}

fn lanes_share(sg_size: u32) -> bool {
    let ballot = subgroupBallot(true);
    return sg_size >= 8u && (ballot.x & 0xffu) == 0xffu;
}

// Offset of row m0 + r of A (clamped to the last row).
fn a_row(t: Tile, r: u32) -> u32 {
    return t.bt * P.a_bs + min(t.m0 + r, P.rows - 1u) * P.a_rs;
}

@compute @workgroup_size(MM_WG)
fn matmul_sg(@builtin(local_invocation_index) li: u32,
             @builtin(workgroup_id) wid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>,
             @builtin(subgroup_invocation_id) lane: u32,
             @builtin(subgroup_size) sg_size: u32) {
    let t = tile_of(li, wid, nwg);
    if (!t.live) {
        return;
    }
    let share = lanes_share(sg_size);
    let bb = t.bt * P.b_bs;
    let b0 = bb + min(t.n0, P.cols - 1u) * P.b_cs;
    let b1 = bb + min(t.n0 + 1u, P.cols - 1u) * P.b_cs;
    let b2 = bb + min(t.n0 + 2u, P.cols - 1u) * P.b_cs;
    let b3 = bb + min(t.n0 + 3u, P.cols - 1u) * P.b_cs;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0);
    var c5 = vec4<f32>(0.0);
    var c6 = vec4<f32>(0.0);
    var c7 = vec4<f32>(0.0);
    var c8 = vec4<f32>(0.0);
    var c9 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0);
    var c11 = vec4<f32>(0.0);
    var c12 = vec4<f32>(0.0);
    var c13 = vec4<f32>(0.0);
    var c14 = vec4<f32>(0.0);
    var c15 = vec4<f32>(0.0);
    if (share) {
        let r_lo = a_row(t, lane & 7u);
        let r_hi = a_row(t, 8u + (lane & 7u));
        for (var ko = 0u; ko < P.kout; ko = ko + 1u) {
            var ak = ko * P.a_ko;
            var bk = ko * P.b_ko;
            for (var k = 0u; k < P.kin; k = k + 1u) {
                let bv = vec4<f32>(b[bk + b0], b[bk + b1], b[bk + b2], b[bk + b3]);
                let lo = a[r_lo + ak];
                let hi = a[r_hi + ak];
                c0 = fma(vec4<f32>(subgroupBroadcast(lo, 0u)), bv, c0);
                c1 = fma(vec4<f32>(subgroupBroadcast(lo, 1u)), bv, c1);
                c2 = fma(vec4<f32>(subgroupBroadcast(lo, 2u)), bv, c2);
                c3 = fma(vec4<f32>(subgroupBroadcast(lo, 3u)), bv, c3);
                c4 = fma(vec4<f32>(subgroupBroadcast(lo, 4u)), bv, c4);
                c5 = fma(vec4<f32>(subgroupBroadcast(lo, 5u)), bv, c5);
                c6 = fma(vec4<f32>(subgroupBroadcast(lo, 6u)), bv, c6);
                c7 = fma(vec4<f32>(subgroupBroadcast(lo, 7u)), bv, c7);
                c8 = fma(vec4<f32>(subgroupBroadcast(hi, 0u)), bv, c8);
                c9 = fma(vec4<f32>(subgroupBroadcast(hi, 1u)), bv, c9);
                c10 = fma(vec4<f32>(subgroupBroadcast(hi, 2u)), bv, c10);
                c11 = fma(vec4<f32>(subgroupBroadcast(hi, 3u)), bv, c11);
                c12 = fma(vec4<f32>(subgroupBroadcast(hi, 4u)), bv, c12);
                c13 = fma(vec4<f32>(subgroupBroadcast(hi, 5u)), bv, c13);
                c14 = fma(vec4<f32>(subgroupBroadcast(hi, 6u)), bv, c14);
                c15 = fma(vec4<f32>(subgroupBroadcast(hi, 7u)), bv, c15);
                ak = ak + P.a_cs;
                bk = bk + P.b_rs;
            }
        }
    } else {
        for (var ko = 0u; ko < P.kout; ko = ko + 1u) {
            for (var k = 0u; k < P.kin; k = k + 1u) {
                let ak = ko * P.a_ko + k * P.a_cs;
                let bk = ko * P.b_ko + k * P.b_rs;
                let bv = vec4<f32>(b[bk + b0], b[bk + b1], b[bk + b2], b[bk + b3]);
                c0 = fma(vec4<f32>(a[a_row(t, 0u) + ak]), bv, c0);
                c1 = fma(vec4<f32>(a[a_row(t, 1u) + ak]), bv, c1);
                c2 = fma(vec4<f32>(a[a_row(t, 2u) + ak]), bv, c2);
                c3 = fma(vec4<f32>(a[a_row(t, 3u) + ak]), bv, c3);
                c4 = fma(vec4<f32>(a[a_row(t, 4u) + ak]), bv, c4);
                c5 = fma(vec4<f32>(a[a_row(t, 5u) + ak]), bv, c5);
                c6 = fma(vec4<f32>(a[a_row(t, 6u) + ak]), bv, c6);
                c7 = fma(vec4<f32>(a[a_row(t, 7u) + ak]), bv, c7);
                c8 = fma(vec4<f32>(a[a_row(t, 8u) + ak]), bv, c8);
                c9 = fma(vec4<f32>(a[a_row(t, 9u) + ak]), bv, c9);
                c10 = fma(vec4<f32>(a[a_row(t, 10u) + ak]), bv, c10);
                c11 = fma(vec4<f32>(a[a_row(t, 11u) + ak]), bv, c11);
                c12 = fma(vec4<f32>(a[a_row(t, 12u) + ak]), bv, c12);
                c13 = fma(vec4<f32>(a[a_row(t, 13u) + ak]), bv, c13);
                c14 = fma(vec4<f32>(a[a_row(t, 14u) + ak]), bv, c14);
                c15 = fma(vec4<f32>(a[a_row(t, 15u) + ak]), bv, c15);
            }
        }
    }
    store_row(c0, t, 0u);
    store_row(c1, t, 1u);
    store_row(c2, t, 2u);
    store_row(c3, t, 3u);
    store_row(c4, t, 4u);
    store_row(c5, t, 5u);
    store_row(c6, t, 6u);
    store_row(c7, t, 7u);
    store_row(c8, t, 8u);
    store_row(c9, t, 9u);
    store_row(c10, t, 10u);
    store_row(c11, t, 11u);
    store_row(c12, t, 12u);
    store_row(c13, t, 13u);
    store_row(c14, t, 14u);
    store_row(c15, t, 15u);
}

// Column `col` = (c, ky, kx) of the conv weight gradient: (channel plane offset, ky*DH - PH,
// kx*DW - PW).
fn wgrad_col(t: Tile, j: u32) -> vec3<i32> {
    let khw = P.kh * P.kw;
    let col = min(t.n0 + j, P.cols - 1u);
    let c = col / khw;
    let ky = (col % khw) / P.kw;
    let kx = col % P.kw;
    return vec3<i32>(i32(c * P.h * P.w), i32(ky * P.dh) - i32(P.ph), i32(kx * P.dw) - i32(P.pw));
}

// x[n, c, iy, ix] for a column's (plane, iy0, ix0) at output pixel (oy, ox) of the image at
// `xn`, or 0 outside the input.
fn x_tap(xn: u32, col: vec3<i32>, oy: u32, ox: u32) -> f32 {
    if (MM_INSIDE == 1u) {
        return b[xn + u32(col.x) + u32(i32(oy * P.sh) + col.y) * P.w + u32(i32(ox * P.sw) + col.z)];
    }
    let iy = i32(oy * P.sh) + col.y;
    let ix = i32(ox * P.sw) + col.z;
    let ok = iy >= 0 && iy < i32(P.h) && ix >= 0 && ix < i32(P.w);
    let i = select(0u, xn + u32(col.x) + u32(iy) * P.w + u32(ix), ok);
    return select(0.0, b[i], ok);
}

@compute @workgroup_size(MM_WG)
fn conv_wgrad_sg(@builtin(local_invocation_index) li: u32,
                 @builtin(workgroup_id) wid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>,
                 @builtin(subgroup_invocation_id) lane: u32,
                 @builtin(subgroup_size) sg_size: u32) {
    let t = tile_of(li, wid, nwg);
    if (!t.live) {
        return;
    }
    let share = lanes_share(sg_size);
    let q0 = wgrad_col(t, 0u);
    let q1 = wgrad_col(t, 1u);
    let q2 = wgrad_col(t, 2u);
    let q3 = wgrad_col(t, 3u);
    let ohw = P.oh * P.ow;
    let chw = P.c * P.h * P.w;
    // dy [N, O, OH, OW]: row o at o * OH*OW, image n at n * O*OH*OW (a_ko), pixel stride 1.
    let r_lo = min(t.m0 + (lane & 7u), P.rows - 1u) * ohw;
    let r_hi = min(t.m0 + 8u + (lane & 7u), P.rows - 1u) * ohw;
    var c0 = vec4<f32>(0.0);
    var c1 = vec4<f32>(0.0);
    var c2 = vec4<f32>(0.0);
    var c3 = vec4<f32>(0.0);
    var c4 = vec4<f32>(0.0);
    var c5 = vec4<f32>(0.0);
    var c6 = vec4<f32>(0.0);
    var c7 = vec4<f32>(0.0);
    var c8 = vec4<f32>(0.0);
    var c9 = vec4<f32>(0.0);
    var c10 = vec4<f32>(0.0);
    var c11 = vec4<f32>(0.0);
    var c12 = vec4<f32>(0.0);
    var c13 = vec4<f32>(0.0);
    var c14 = vec4<f32>(0.0);
    var c15 = vec4<f32>(0.0);
    for (var n = 0u; n < P.kout; n = n + 1u) {
        let xn = n * chw;
        var pix = n * P.a_ko;
        for (var oy = 0u; oy < P.oh; oy = oy + 1u) {
            for (var ox = 0u; ox < P.ow; ox = ox + 1u) {
                let bv = vec4<f32>(x_tap(xn, q0, oy, ox), x_tap(xn, q1, oy, ox),
                                   x_tap(xn, q2, oy, ox), x_tap(xn, q3, oy, ox));
                if (share) {
                    let lo = a[r_lo + pix];
                    let hi = a[r_hi + pix];
                    c0 = fma(vec4<f32>(subgroupBroadcast(lo, 0u)), bv, c0);
                    c1 = fma(vec4<f32>(subgroupBroadcast(lo, 1u)), bv, c1);
                    c2 = fma(vec4<f32>(subgroupBroadcast(lo, 2u)), bv, c2);
                    c3 = fma(vec4<f32>(subgroupBroadcast(lo, 3u)), bv, c3);
                    c4 = fma(vec4<f32>(subgroupBroadcast(lo, 4u)), bv, c4);
                    c5 = fma(vec4<f32>(subgroupBroadcast(lo, 5u)), bv, c5);
                    c6 = fma(vec4<f32>(subgroupBroadcast(lo, 6u)), bv, c6);
                    c7 = fma(vec4<f32>(subgroupBroadcast(lo, 7u)), bv, c7);
                    c8 = fma(vec4<f32>(subgroupBroadcast(hi, 0u)), bv, c8);
                    c9 = fma(vec4<f32>(subgroupBroadcast(hi, 1u)), bv, c9);
                    c10 = fma(vec4<f32>(subgroupBroadcast(hi, 2u)), bv, c10);
                    c11 = fma(vec4<f32>(subgroupBroadcast(hi, 3u)), bv, c11);
                    c12 = fma(vec4<f32>(subgroupBroadcast(hi, 4u)), bv, c12);
                    c13 = fma(vec4<f32>(subgroupBroadcast(hi, 5u)), bv, c13);
                    c14 = fma(vec4<f32>(subgroupBroadcast(hi, 6u)), bv, c14);
                    c15 = fma(vec4<f32>(subgroupBroadcast(hi, 7u)), bv, c15);
                } else {
                    c0 = fma(vec4<f32>(a[min(t.m0 + 0u, P.rows - 1u) * ohw + pix]), bv, c0);
                    c1 = fma(vec4<f32>(a[min(t.m0 + 1u, P.rows - 1u) * ohw + pix]), bv, c1);
                    c2 = fma(vec4<f32>(a[min(t.m0 + 2u, P.rows - 1u) * ohw + pix]), bv, c2);
                    c3 = fma(vec4<f32>(a[min(t.m0 + 3u, P.rows - 1u) * ohw + pix]), bv, c3);
                    c4 = fma(vec4<f32>(a[min(t.m0 + 4u, P.rows - 1u) * ohw + pix]), bv, c4);
                    c5 = fma(vec4<f32>(a[min(t.m0 + 5u, P.rows - 1u) * ohw + pix]), bv, c5);
                    c6 = fma(vec4<f32>(a[min(t.m0 + 6u, P.rows - 1u) * ohw + pix]), bv, c6);
                    c7 = fma(vec4<f32>(a[min(t.m0 + 7u, P.rows - 1u) * ohw + pix]), bv, c7);
                    c8 = fma(vec4<f32>(a[min(t.m0 + 8u, P.rows - 1u) * ohw + pix]), bv, c8);
                    c9 = fma(vec4<f32>(a[min(t.m0 + 9u, P.rows - 1u) * ohw + pix]), bv, c9);
                    c10 = fma(vec4<f32>(a[min(t.m0 + 10u, P.rows - 1u) * ohw + pix]), bv, c10);
                    c11 = fma(vec4<f32>(a[min(t.m0 + 11u, P.rows - 1u) * ohw + pix]), bv, c11);
                    c12 = fma(vec4<f32>(a[min(t.m0 + 12u, P.rows - 1u) * ohw + pix]), bv, c12);
                    c13 = fma(vec4<f32>(a[min(t.m0 + 13u, P.rows - 1u) * ohw + pix]), bv, c13);
                    c14 = fma(vec4<f32>(a[min(t.m0 + 14u, P.rows - 1u) * ohw + pix]), bv, c14);
                    c15 = fma(vec4<f32>(a[min(t.m0 + 15u, P.rows - 1u) * ohw + pix]), bv, c15);
                }
                pix = pix + 1u;
            }
        }
    }
    store_row(c0, t, 0u);
    store_row(c1, t, 1u);
    store_row(c2, t, 2u);
    store_row(c3, t, 3u);
    store_row(c4, t, 4u);
    store_row(c5, t, 5u);
    store_row(c6, t, 6u);
    store_row(c7, t, 7u);
    store_row(c8, t, 8u);
    store_row(c9, t, 9u);
    store_row(c10, t, 10u);
    store_row(c11, t, 11u);
    store_row(c12, t, 12u);
    store_row(c13, t, 13u);
    store_row(c14, t, 14u);
    store_row(c15, t, 15u);
}

@compute @workgroup_size(MM_WG)
fn col2im(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * MM_WG);
    if (i >= P.count) {
        return;
    }
    let ix = i % P.w;
    var rest = i / P.w;
    let iy = rest % P.h;
    rest = rest / P.h;
    let c = rest % P.c;
    let n = rest / P.c;
    let ohw = P.oh * P.ow;
    let khw = P.kh * P.kw;
    let base = (n * P.c + c) * khw;
    var acc = 0.0;
    for (var ky = 0u; ky < P.kh; ky = ky + 1u) {
        let oy = i32(iy + P.ph) - i32(ky);
        if (oy >= 0 && oy < i32(P.oh)) {
            for (var kx = 0u; kx < P.kw; kx = kx + 1u) {
                let ox = i32(ix + P.pw) - i32(kx);
                if (ox >= 0 && ox < i32(P.ow)) {
                    let row = base + ky * P.kw + kx;
                    acc = acc + a[row * ohw + u32(oy) * P.ow + u32(ox)];
                }
            }
        }
    }
    out[i] = acc;
}

// conv_wgrad3_sg2 / conv_wgrad3_sg4: the weight gradient of a conv2d with a 3x3 kernel, stride 1
// and dilation 1 along the width (any stride and dilation along the height), groups 1,
// explicit padding:
//   out[o, c, ky, kx] = sum over n < N, oy < OH, ox < OW of dy[n, o, oy, ox] *
//       x[n, c, oy*SH + ky*DH - PH, ox + kx - PW]   (zero outside the input).
// Each invocation computes 16 output channels (o = m0 .. m0 + 15) x 2 input channels
// (c0 = 2 * (ct * MM_WG + li) ..) x all 9 taps in 96 vec3 accumulators (one per output
// channel, input channel and kernel row, over kx), running over every output pixel in order,
// COLS = 2 or 4 columns of a row per step: per step it loads COLS new input values per kernel
// row and input channel (a window of COLS + 2 slides along each row) and 2 * COLS values of
// dy, whose 16 rows it shares by subgroup broadcast as matmul_sg does, and updates each
// accumulator once with a chain of COLS fmas (pixel order, so the sums are those of one pixel
// per step). Why: on lavapipe the 96 accumulators live in memory, and one fma per
// accumulator load and store (one column per step) made the stores the bound: 8x64x56x56,
// 1 / 2 / 4 columns: 101-104 / 79-81 / 72-74 ms. Columns past OW in a row's last step take
// zero dy and zero inputs (no 0 * inf). The launcher runs conv_wgrad3_sg4 where OW is a
// multiple of 4, else conv_wgrad3_sg2 (at OW 14 and 7 the 4-column form computes 2 and 1
// idle columns per row and was slower).
// Generated by tools/gen_wgrad3.py (the unrolled bodies between the markers below).
// Workgroup (MM_WG, 1, 1) over input channel groups; all invocations of a workgroup share
// the row block. count = mtiles * ctiles workgroups, mtiles = ceil(O / 16),
// ctiles = ceil(C / (2 * MM_WG)); flat id wid.x + wid.y * nwg.x decomposed as (channel tile
// fastest, row tile); channels past C are computed on a clamped channel and not stored.
// Params: rows = O, cols = C, kout = N, a_ko = O*OH*OW, ctiles, count, c, h, w, oh, ow, sh,
// ph, pw, dh. Row sharing and its fallback (each invocation loading its own rows) as
// matmul_sg; uniform control flow as matmul_sg.

fn wgrad3_store(t: Tile, q: u32, r: u32, va: vec3<f32>, vb: vec3<f32>, vc: vec3<f32>) {
    let o = t.m0 + r;
    let c = t.n0 + q;
    if (o >= P.rows || c >= P.cols) {
        return;
    }
    let base = (o * P.cols + c) * 9u;
    out[base] = va.x;
    out[base + 1u] = va.y;
    out[base + 2u] = va.z;
    out[base + 3u] = vb.x;
    out[base + 4u] = vb.y;
    out[base + 5u] = vb.z;
    out[base + 6u] = vc.x;
    out[base + 7u] = vc.y;
    out[base + 8u] = vc.z;
}

// x at row offset `row` (of a row inside the input when `rok`) and column ix, or zero.
fn wgrad3_x(row: u32, rok: bool, ix: i32) -> f32 {
    let ok = rok && ix >= 0 && ix < i32(P.w);
    return select(0.0, b[select(0u, row + u32(ix), ok)], ok);
}

// BEGIN generated by tools/gen_wgrad3.py (do not edit by hand)
@compute @workgroup_size(MM_WG)
fn conv_wgrad3_sg2(@builtin(local_invocation_index) li: u32,
                   @builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_invocation_id) lane: u32,
                   @builtin(subgroup_size) sg_size: u32) {
    let id = wid.x + wid.y * nwg.x;
    if (id >= P.count) {
        return;
    }
    var t: Tile;
    t.live = true;
    t.bt = 0u;
    t.m0 = (id / P.ctiles) * 16u;
    t.n0 = ((id % P.ctiles) * MM_WG + li) * 2u;
    let share = lanes_share(sg_size);
    let c0 = t.n0;
    let ohw = P.oh * P.ow;
    let hw = P.h * P.w;
    let r_lo = min(t.m0 + (lane & 7u), P.rows - 1u) * ohw;
    let r_hi = min(t.m0 + 8u + (lane & 7u), P.rows - 1u) * ohw;
    var c0_0a = vec3<f32>(0.0);
    var c0_0b = vec3<f32>(0.0);
    var c0_0c = vec3<f32>(0.0);
    var c0_1a = vec3<f32>(0.0);
    var c0_1b = vec3<f32>(0.0);
    var c0_1c = vec3<f32>(0.0);
    var c0_2a = vec3<f32>(0.0);
    var c0_2b = vec3<f32>(0.0);
    var c0_2c = vec3<f32>(0.0);
    var c0_3a = vec3<f32>(0.0);
    var c0_3b = vec3<f32>(0.0);
    var c0_3c = vec3<f32>(0.0);
    var c0_4a = vec3<f32>(0.0);
    var c0_4b = vec3<f32>(0.0);
    var c0_4c = vec3<f32>(0.0);
    var c0_5a = vec3<f32>(0.0);
    var c0_5b = vec3<f32>(0.0);
    var c0_5c = vec3<f32>(0.0);
    var c0_6a = vec3<f32>(0.0);
    var c0_6b = vec3<f32>(0.0);
    var c0_6c = vec3<f32>(0.0);
    var c0_7a = vec3<f32>(0.0);
    var c0_7b = vec3<f32>(0.0);
    var c0_7c = vec3<f32>(0.0);
    var c0_8a = vec3<f32>(0.0);
    var c0_8b = vec3<f32>(0.0);
    var c0_8c = vec3<f32>(0.0);
    var c0_9a = vec3<f32>(0.0);
    var c0_9b = vec3<f32>(0.0);
    var c0_9c = vec3<f32>(0.0);
    var c0_10a = vec3<f32>(0.0);
    var c0_10b = vec3<f32>(0.0);
    var c0_10c = vec3<f32>(0.0);
    var c0_11a = vec3<f32>(0.0);
    var c0_11b = vec3<f32>(0.0);
    var c0_11c = vec3<f32>(0.0);
    var c0_12a = vec3<f32>(0.0);
    var c0_12b = vec3<f32>(0.0);
    var c0_12c = vec3<f32>(0.0);
    var c0_13a = vec3<f32>(0.0);
    var c0_13b = vec3<f32>(0.0);
    var c0_13c = vec3<f32>(0.0);
    var c0_14a = vec3<f32>(0.0);
    var c0_14b = vec3<f32>(0.0);
    var c0_14c = vec3<f32>(0.0);
    var c0_15a = vec3<f32>(0.0);
    var c0_15b = vec3<f32>(0.0);
    var c0_15c = vec3<f32>(0.0);
    var c1_0a = vec3<f32>(0.0);
    var c1_0b = vec3<f32>(0.0);
    var c1_0c = vec3<f32>(0.0);
    var c1_1a = vec3<f32>(0.0);
    var c1_1b = vec3<f32>(0.0);
    var c1_1c = vec3<f32>(0.0);
    var c1_2a = vec3<f32>(0.0);
    var c1_2b = vec3<f32>(0.0);
    var c1_2c = vec3<f32>(0.0);
    var c1_3a = vec3<f32>(0.0);
    var c1_3b = vec3<f32>(0.0);
    var c1_3c = vec3<f32>(0.0);
    var c1_4a = vec3<f32>(0.0);
    var c1_4b = vec3<f32>(0.0);
    var c1_4c = vec3<f32>(0.0);
    var c1_5a = vec3<f32>(0.0);
    var c1_5b = vec3<f32>(0.0);
    var c1_5c = vec3<f32>(0.0);
    var c1_6a = vec3<f32>(0.0);
    var c1_6b = vec3<f32>(0.0);
    var c1_6c = vec3<f32>(0.0);
    var c1_7a = vec3<f32>(0.0);
    var c1_7b = vec3<f32>(0.0);
    var c1_7c = vec3<f32>(0.0);
    var c1_8a = vec3<f32>(0.0);
    var c1_8b = vec3<f32>(0.0);
    var c1_8c = vec3<f32>(0.0);
    var c1_9a = vec3<f32>(0.0);
    var c1_9b = vec3<f32>(0.0);
    var c1_9c = vec3<f32>(0.0);
    var c1_10a = vec3<f32>(0.0);
    var c1_10b = vec3<f32>(0.0);
    var c1_10c = vec3<f32>(0.0);
    var c1_11a = vec3<f32>(0.0);
    var c1_11b = vec3<f32>(0.0);
    var c1_11c = vec3<f32>(0.0);
    var c1_12a = vec3<f32>(0.0);
    var c1_12b = vec3<f32>(0.0);
    var c1_12c = vec3<f32>(0.0);
    var c1_13a = vec3<f32>(0.0);
    var c1_13b = vec3<f32>(0.0);
    var c1_13c = vec3<f32>(0.0);
    var c1_14a = vec3<f32>(0.0);
    var c1_14b = vec3<f32>(0.0);
    var c1_14c = vec3<f32>(0.0);
    var c1_15a = vec3<f32>(0.0);
    var c1_15b = vec3<f32>(0.0);
    var c1_15c = vec3<f32>(0.0);
    for (var n = 0u; n < P.kout; n = n + 1u) {
        let plane0 = (n * P.cols + min(c0 + 0u, P.cols - 1u)) * hw;
        let plane1 = (n * P.cols + min(c0 + 1u, P.cols - 1u)) * hw;
        for (var oy = 0u; oy < P.oh; oy = oy + 1u) {
            let iy0 = i32(oy * P.sh) - i32(P.ph);
            let iy1 = iy0 + i32(P.dh);
            let iy2 = iy1 + i32(P.dh);
            let ok0 = iy0 >= 0 && iy0 < i32(P.h);
            let ok1 = iy1 >= 0 && iy1 < i32(P.h);
            let ok2 = iy2 >= 0 && iy2 < i32(P.h);
            let row00 = plane0 + u32(max(iy0, 0)) * P.w;
            let row01 = plane0 + u32(max(iy1, 0)) * P.w;
            let row02 = plane0 + u32(max(iy2, 0)) * P.w;
            let row10 = plane1 + u32(max(iy0, 0)) * P.w;
            let row11 = plane1 + u32(max(iy1, 0)) * P.w;
            let row12 = plane1 + u32(max(iy2, 0)) * P.w;
            let ix0 = -i32(P.pw);
            var x0_0_0 = wgrad3_x(row00, ok0, ix0);
            var x0_0_1 = wgrad3_x(row00, ok0, ix0 + 1);
            var x0_1_0 = wgrad3_x(row01, ok1, ix0);
            var x0_1_1 = wgrad3_x(row01, ok1, ix0 + 1);
            var x0_2_0 = wgrad3_x(row02, ok2, ix0);
            var x0_2_1 = wgrad3_x(row02, ok2, ix0 + 1);
            var x1_0_0 = wgrad3_x(row10, ok0, ix0);
            var x1_0_1 = wgrad3_x(row10, ok0, ix0 + 1);
            var x1_1_0 = wgrad3_x(row11, ok1, ix0);
            var x1_1_1 = wgrad3_x(row11, ok1, ix0 + 1);
            var x1_2_0 = wgrad3_x(row12, ok2, ix0);
            var x1_2_1 = wgrad3_x(row12, ok2, ix0 + 1);
            var pix = n * P.a_ko + oy * P.ow;
            for (var ox = 0u; ox < P.ow; ox = ox + 2u) {
                // Columns ox + j, j < 2: live{j} unless past OW (the last step of a row); a column
                // past OW takes zero dy and zero inputs (no 0 * inf).
                let live1 = ox + 1u < P.ow;
                let ix = i32(ox) + ix0 + 2;
                let x0_0_2 = wgrad3_x(row00, ok0, ix + 0);
                let x0_0_3 = wgrad3_x(row00, ok0, ix + 1);
                let x0_1_2 = wgrad3_x(row01, ok1, ix + 0);
                let x0_1_3 = wgrad3_x(row01, ok1, ix + 1);
                let x0_2_2 = wgrad3_x(row02, ok2, ix + 0);
                let x0_2_3 = wgrad3_x(row02, ok2, ix + 1);
                let x1_0_2 = wgrad3_x(row10, ok0, ix + 0);
                let x1_0_3 = wgrad3_x(row10, ok0, ix + 1);
                let x1_1_2 = wgrad3_x(row11, ok1, ix + 0);
                let x1_1_3 = wgrad3_x(row11, ok1, ix + 1);
                let x1_2_2 = wgrad3_x(row12, ok2, ix + 0);
                let x1_2_3 = wgrad3_x(row12, ok2, ix + 1);
                let pix1 = pix + select(0u, 1u, live1);
                let v0_0a = vec3<f32>(x0_0_0, x0_0_1, x0_0_2);
                let v0_0b = vec3<f32>(x0_1_0, x0_1_1, x0_1_2);
                let v0_0c = vec3<f32>(x0_2_0, x0_2_1, x0_2_2);
                let v0_1a = vec3<f32>(x1_0_0, x1_0_1, x1_0_2);
                let v0_1b = vec3<f32>(x1_1_0, x1_1_1, x1_1_2);
                let v0_1c = vec3<f32>(x1_2_0, x1_2_1, x1_2_2);
                let v1_0a = select(vec3<f32>(0.0), vec3<f32>(x0_0_1, x0_0_2, x0_0_3), live1);
                let v1_0b = select(vec3<f32>(0.0), vec3<f32>(x0_1_1, x0_1_2, x0_1_3), live1);
                let v1_0c = select(vec3<f32>(0.0), vec3<f32>(x0_2_1, x0_2_2, x0_2_3), live1);
                let v1_1a = select(vec3<f32>(0.0), vec3<f32>(x1_0_1, x1_0_2, x1_0_3), live1);
                let v1_1b = select(vec3<f32>(0.0), vec3<f32>(x1_1_1, x1_1_2, x1_1_3), live1);
                let v1_1c = select(vec3<f32>(0.0), vec3<f32>(x1_2_1, x1_2_2, x1_2_3), live1);
                if (share) {
                    let lo0 = a[r_lo + pix];
                    let hi0 = a[r_hi + pix];
                    let lo1 = select(0.0, a[r_lo + pix1], live1);
                    let hi1 = select(0.0, a[r_hi + pix1], live1);
                    let d0_0 = vec3<f32>(subgroupBroadcast(lo0, 0u));
                    let d0_1 = vec3<f32>(subgroupBroadcast(lo1, 0u));
                    c0_0a = fma(d0_1, v1_0a, fma(d0_0, v0_0a, c0_0a));
                    c0_0b = fma(d0_1, v1_0b, fma(d0_0, v0_0b, c0_0b));
                    c0_0c = fma(d0_1, v1_0c, fma(d0_0, v0_0c, c0_0c));
                    c1_0a = fma(d0_1, v1_1a, fma(d0_0, v0_1a, c1_0a));
                    c1_0b = fma(d0_1, v1_1b, fma(d0_0, v0_1b, c1_0b));
                    c1_0c = fma(d0_1, v1_1c, fma(d0_0, v0_1c, c1_0c));
                    let d1_0 = vec3<f32>(subgroupBroadcast(lo0, 1u));
                    let d1_1 = vec3<f32>(subgroupBroadcast(lo1, 1u));
                    c0_1a = fma(d1_1, v1_0a, fma(d1_0, v0_0a, c0_1a));
                    c0_1b = fma(d1_1, v1_0b, fma(d1_0, v0_0b, c0_1b));
                    c0_1c = fma(d1_1, v1_0c, fma(d1_0, v0_0c, c0_1c));
                    c1_1a = fma(d1_1, v1_1a, fma(d1_0, v0_1a, c1_1a));
                    c1_1b = fma(d1_1, v1_1b, fma(d1_0, v0_1b, c1_1b));
                    c1_1c = fma(d1_1, v1_1c, fma(d1_0, v0_1c, c1_1c));
                    let d2_0 = vec3<f32>(subgroupBroadcast(lo0, 2u));
                    let d2_1 = vec3<f32>(subgroupBroadcast(lo1, 2u));
                    c0_2a = fma(d2_1, v1_0a, fma(d2_0, v0_0a, c0_2a));
                    c0_2b = fma(d2_1, v1_0b, fma(d2_0, v0_0b, c0_2b));
                    c0_2c = fma(d2_1, v1_0c, fma(d2_0, v0_0c, c0_2c));
                    c1_2a = fma(d2_1, v1_1a, fma(d2_0, v0_1a, c1_2a));
                    c1_2b = fma(d2_1, v1_1b, fma(d2_0, v0_1b, c1_2b));
                    c1_2c = fma(d2_1, v1_1c, fma(d2_0, v0_1c, c1_2c));
                    let d3_0 = vec3<f32>(subgroupBroadcast(lo0, 3u));
                    let d3_1 = vec3<f32>(subgroupBroadcast(lo1, 3u));
                    c0_3a = fma(d3_1, v1_0a, fma(d3_0, v0_0a, c0_3a));
                    c0_3b = fma(d3_1, v1_0b, fma(d3_0, v0_0b, c0_3b));
                    c0_3c = fma(d3_1, v1_0c, fma(d3_0, v0_0c, c0_3c));
                    c1_3a = fma(d3_1, v1_1a, fma(d3_0, v0_1a, c1_3a));
                    c1_3b = fma(d3_1, v1_1b, fma(d3_0, v0_1b, c1_3b));
                    c1_3c = fma(d3_1, v1_1c, fma(d3_0, v0_1c, c1_3c));
                    let d4_0 = vec3<f32>(subgroupBroadcast(lo0, 4u));
                    let d4_1 = vec3<f32>(subgroupBroadcast(lo1, 4u));
                    c0_4a = fma(d4_1, v1_0a, fma(d4_0, v0_0a, c0_4a));
                    c0_4b = fma(d4_1, v1_0b, fma(d4_0, v0_0b, c0_4b));
                    c0_4c = fma(d4_1, v1_0c, fma(d4_0, v0_0c, c0_4c));
                    c1_4a = fma(d4_1, v1_1a, fma(d4_0, v0_1a, c1_4a));
                    c1_4b = fma(d4_1, v1_1b, fma(d4_0, v0_1b, c1_4b));
                    c1_4c = fma(d4_1, v1_1c, fma(d4_0, v0_1c, c1_4c));
                    let d5_0 = vec3<f32>(subgroupBroadcast(lo0, 5u));
                    let d5_1 = vec3<f32>(subgroupBroadcast(lo1, 5u));
                    c0_5a = fma(d5_1, v1_0a, fma(d5_0, v0_0a, c0_5a));
                    c0_5b = fma(d5_1, v1_0b, fma(d5_0, v0_0b, c0_5b));
                    c0_5c = fma(d5_1, v1_0c, fma(d5_0, v0_0c, c0_5c));
                    c1_5a = fma(d5_1, v1_1a, fma(d5_0, v0_1a, c1_5a));
                    c1_5b = fma(d5_1, v1_1b, fma(d5_0, v0_1b, c1_5b));
                    c1_5c = fma(d5_1, v1_1c, fma(d5_0, v0_1c, c1_5c));
                    let d6_0 = vec3<f32>(subgroupBroadcast(lo0, 6u));
                    let d6_1 = vec3<f32>(subgroupBroadcast(lo1, 6u));
                    c0_6a = fma(d6_1, v1_0a, fma(d6_0, v0_0a, c0_6a));
                    c0_6b = fma(d6_1, v1_0b, fma(d6_0, v0_0b, c0_6b));
                    c0_6c = fma(d6_1, v1_0c, fma(d6_0, v0_0c, c0_6c));
                    c1_6a = fma(d6_1, v1_1a, fma(d6_0, v0_1a, c1_6a));
                    c1_6b = fma(d6_1, v1_1b, fma(d6_0, v0_1b, c1_6b));
                    c1_6c = fma(d6_1, v1_1c, fma(d6_0, v0_1c, c1_6c));
                    let d7_0 = vec3<f32>(subgroupBroadcast(lo0, 7u));
                    let d7_1 = vec3<f32>(subgroupBroadcast(lo1, 7u));
                    c0_7a = fma(d7_1, v1_0a, fma(d7_0, v0_0a, c0_7a));
                    c0_7b = fma(d7_1, v1_0b, fma(d7_0, v0_0b, c0_7b));
                    c0_7c = fma(d7_1, v1_0c, fma(d7_0, v0_0c, c0_7c));
                    c1_7a = fma(d7_1, v1_1a, fma(d7_0, v0_1a, c1_7a));
                    c1_7b = fma(d7_1, v1_1b, fma(d7_0, v0_1b, c1_7b));
                    c1_7c = fma(d7_1, v1_1c, fma(d7_0, v0_1c, c1_7c));
                    let d8_0 = vec3<f32>(subgroupBroadcast(hi0, 0u));
                    let d8_1 = vec3<f32>(subgroupBroadcast(hi1, 0u));
                    c0_8a = fma(d8_1, v1_0a, fma(d8_0, v0_0a, c0_8a));
                    c0_8b = fma(d8_1, v1_0b, fma(d8_0, v0_0b, c0_8b));
                    c0_8c = fma(d8_1, v1_0c, fma(d8_0, v0_0c, c0_8c));
                    c1_8a = fma(d8_1, v1_1a, fma(d8_0, v0_1a, c1_8a));
                    c1_8b = fma(d8_1, v1_1b, fma(d8_0, v0_1b, c1_8b));
                    c1_8c = fma(d8_1, v1_1c, fma(d8_0, v0_1c, c1_8c));
                    let d9_0 = vec3<f32>(subgroupBroadcast(hi0, 1u));
                    let d9_1 = vec3<f32>(subgroupBroadcast(hi1, 1u));
                    c0_9a = fma(d9_1, v1_0a, fma(d9_0, v0_0a, c0_9a));
                    c0_9b = fma(d9_1, v1_0b, fma(d9_0, v0_0b, c0_9b));
                    c0_9c = fma(d9_1, v1_0c, fma(d9_0, v0_0c, c0_9c));
                    c1_9a = fma(d9_1, v1_1a, fma(d9_0, v0_1a, c1_9a));
                    c1_9b = fma(d9_1, v1_1b, fma(d9_0, v0_1b, c1_9b));
                    c1_9c = fma(d9_1, v1_1c, fma(d9_0, v0_1c, c1_9c));
                    let d10_0 = vec3<f32>(subgroupBroadcast(hi0, 2u));
                    let d10_1 = vec3<f32>(subgroupBroadcast(hi1, 2u));
                    c0_10a = fma(d10_1, v1_0a, fma(d10_0, v0_0a, c0_10a));
                    c0_10b = fma(d10_1, v1_0b, fma(d10_0, v0_0b, c0_10b));
                    c0_10c = fma(d10_1, v1_0c, fma(d10_0, v0_0c, c0_10c));
                    c1_10a = fma(d10_1, v1_1a, fma(d10_0, v0_1a, c1_10a));
                    c1_10b = fma(d10_1, v1_1b, fma(d10_0, v0_1b, c1_10b));
                    c1_10c = fma(d10_1, v1_1c, fma(d10_0, v0_1c, c1_10c));
                    let d11_0 = vec3<f32>(subgroupBroadcast(hi0, 3u));
                    let d11_1 = vec3<f32>(subgroupBroadcast(hi1, 3u));
                    c0_11a = fma(d11_1, v1_0a, fma(d11_0, v0_0a, c0_11a));
                    c0_11b = fma(d11_1, v1_0b, fma(d11_0, v0_0b, c0_11b));
                    c0_11c = fma(d11_1, v1_0c, fma(d11_0, v0_0c, c0_11c));
                    c1_11a = fma(d11_1, v1_1a, fma(d11_0, v0_1a, c1_11a));
                    c1_11b = fma(d11_1, v1_1b, fma(d11_0, v0_1b, c1_11b));
                    c1_11c = fma(d11_1, v1_1c, fma(d11_0, v0_1c, c1_11c));
                    let d12_0 = vec3<f32>(subgroupBroadcast(hi0, 4u));
                    let d12_1 = vec3<f32>(subgroupBroadcast(hi1, 4u));
                    c0_12a = fma(d12_1, v1_0a, fma(d12_0, v0_0a, c0_12a));
                    c0_12b = fma(d12_1, v1_0b, fma(d12_0, v0_0b, c0_12b));
                    c0_12c = fma(d12_1, v1_0c, fma(d12_0, v0_0c, c0_12c));
                    c1_12a = fma(d12_1, v1_1a, fma(d12_0, v0_1a, c1_12a));
                    c1_12b = fma(d12_1, v1_1b, fma(d12_0, v0_1b, c1_12b));
                    c1_12c = fma(d12_1, v1_1c, fma(d12_0, v0_1c, c1_12c));
                    let d13_0 = vec3<f32>(subgroupBroadcast(hi0, 5u));
                    let d13_1 = vec3<f32>(subgroupBroadcast(hi1, 5u));
                    c0_13a = fma(d13_1, v1_0a, fma(d13_0, v0_0a, c0_13a));
                    c0_13b = fma(d13_1, v1_0b, fma(d13_0, v0_0b, c0_13b));
                    c0_13c = fma(d13_1, v1_0c, fma(d13_0, v0_0c, c0_13c));
                    c1_13a = fma(d13_1, v1_1a, fma(d13_0, v0_1a, c1_13a));
                    c1_13b = fma(d13_1, v1_1b, fma(d13_0, v0_1b, c1_13b));
                    c1_13c = fma(d13_1, v1_1c, fma(d13_0, v0_1c, c1_13c));
                    let d14_0 = vec3<f32>(subgroupBroadcast(hi0, 6u));
                    let d14_1 = vec3<f32>(subgroupBroadcast(hi1, 6u));
                    c0_14a = fma(d14_1, v1_0a, fma(d14_0, v0_0a, c0_14a));
                    c0_14b = fma(d14_1, v1_0b, fma(d14_0, v0_0b, c0_14b));
                    c0_14c = fma(d14_1, v1_0c, fma(d14_0, v0_0c, c0_14c));
                    c1_14a = fma(d14_1, v1_1a, fma(d14_0, v0_1a, c1_14a));
                    c1_14b = fma(d14_1, v1_1b, fma(d14_0, v0_1b, c1_14b));
                    c1_14c = fma(d14_1, v1_1c, fma(d14_0, v0_1c, c1_14c));
                    let d15_0 = vec3<f32>(subgroupBroadcast(hi0, 7u));
                    let d15_1 = vec3<f32>(subgroupBroadcast(hi1, 7u));
                    c0_15a = fma(d15_1, v1_0a, fma(d15_0, v0_0a, c0_15a));
                    c0_15b = fma(d15_1, v1_0b, fma(d15_0, v0_0b, c0_15b));
                    c0_15c = fma(d15_1, v1_0c, fma(d15_0, v0_0c, c0_15c));
                    c1_15a = fma(d15_1, v1_1a, fma(d15_0, v0_1a, c1_15a));
                    c1_15b = fma(d15_1, v1_1b, fma(d15_0, v0_1b, c1_15b));
                    c1_15c = fma(d15_1, v1_1c, fma(d15_0, v0_1c, c1_15c));
                } else {
                    let r0 = min(t.m0 + 0u, P.rows - 1u) * ohw;
                    let d0_0 = vec3<f32>(a[r0 + pix]);
                    let d0_1 = vec3<f32>(select(0.0, a[r0 + pix1], live1));
                    c0_0a = fma(d0_1, v1_0a, fma(d0_0, v0_0a, c0_0a));
                    c0_0b = fma(d0_1, v1_0b, fma(d0_0, v0_0b, c0_0b));
                    c0_0c = fma(d0_1, v1_0c, fma(d0_0, v0_0c, c0_0c));
                    c1_0a = fma(d0_1, v1_1a, fma(d0_0, v0_1a, c1_0a));
                    c1_0b = fma(d0_1, v1_1b, fma(d0_0, v0_1b, c1_0b));
                    c1_0c = fma(d0_1, v1_1c, fma(d0_0, v0_1c, c1_0c));
                    let r1 = min(t.m0 + 1u, P.rows - 1u) * ohw;
                    let d1_0 = vec3<f32>(a[r1 + pix]);
                    let d1_1 = vec3<f32>(select(0.0, a[r1 + pix1], live1));
                    c0_1a = fma(d1_1, v1_0a, fma(d1_0, v0_0a, c0_1a));
                    c0_1b = fma(d1_1, v1_0b, fma(d1_0, v0_0b, c0_1b));
                    c0_1c = fma(d1_1, v1_0c, fma(d1_0, v0_0c, c0_1c));
                    c1_1a = fma(d1_1, v1_1a, fma(d1_0, v0_1a, c1_1a));
                    c1_1b = fma(d1_1, v1_1b, fma(d1_0, v0_1b, c1_1b));
                    c1_1c = fma(d1_1, v1_1c, fma(d1_0, v0_1c, c1_1c));
                    let r2 = min(t.m0 + 2u, P.rows - 1u) * ohw;
                    let d2_0 = vec3<f32>(a[r2 + pix]);
                    let d2_1 = vec3<f32>(select(0.0, a[r2 + pix1], live1));
                    c0_2a = fma(d2_1, v1_0a, fma(d2_0, v0_0a, c0_2a));
                    c0_2b = fma(d2_1, v1_0b, fma(d2_0, v0_0b, c0_2b));
                    c0_2c = fma(d2_1, v1_0c, fma(d2_0, v0_0c, c0_2c));
                    c1_2a = fma(d2_1, v1_1a, fma(d2_0, v0_1a, c1_2a));
                    c1_2b = fma(d2_1, v1_1b, fma(d2_0, v0_1b, c1_2b));
                    c1_2c = fma(d2_1, v1_1c, fma(d2_0, v0_1c, c1_2c));
                    let r3 = min(t.m0 + 3u, P.rows - 1u) * ohw;
                    let d3_0 = vec3<f32>(a[r3 + pix]);
                    let d3_1 = vec3<f32>(select(0.0, a[r3 + pix1], live1));
                    c0_3a = fma(d3_1, v1_0a, fma(d3_0, v0_0a, c0_3a));
                    c0_3b = fma(d3_1, v1_0b, fma(d3_0, v0_0b, c0_3b));
                    c0_3c = fma(d3_1, v1_0c, fma(d3_0, v0_0c, c0_3c));
                    c1_3a = fma(d3_1, v1_1a, fma(d3_0, v0_1a, c1_3a));
                    c1_3b = fma(d3_1, v1_1b, fma(d3_0, v0_1b, c1_3b));
                    c1_3c = fma(d3_1, v1_1c, fma(d3_0, v0_1c, c1_3c));
                    let r4 = min(t.m0 + 4u, P.rows - 1u) * ohw;
                    let d4_0 = vec3<f32>(a[r4 + pix]);
                    let d4_1 = vec3<f32>(select(0.0, a[r4 + pix1], live1));
                    c0_4a = fma(d4_1, v1_0a, fma(d4_0, v0_0a, c0_4a));
                    c0_4b = fma(d4_1, v1_0b, fma(d4_0, v0_0b, c0_4b));
                    c0_4c = fma(d4_1, v1_0c, fma(d4_0, v0_0c, c0_4c));
                    c1_4a = fma(d4_1, v1_1a, fma(d4_0, v0_1a, c1_4a));
                    c1_4b = fma(d4_1, v1_1b, fma(d4_0, v0_1b, c1_4b));
                    c1_4c = fma(d4_1, v1_1c, fma(d4_0, v0_1c, c1_4c));
                    let r5 = min(t.m0 + 5u, P.rows - 1u) * ohw;
                    let d5_0 = vec3<f32>(a[r5 + pix]);
                    let d5_1 = vec3<f32>(select(0.0, a[r5 + pix1], live1));
                    c0_5a = fma(d5_1, v1_0a, fma(d5_0, v0_0a, c0_5a));
                    c0_5b = fma(d5_1, v1_0b, fma(d5_0, v0_0b, c0_5b));
                    c0_5c = fma(d5_1, v1_0c, fma(d5_0, v0_0c, c0_5c));
                    c1_5a = fma(d5_1, v1_1a, fma(d5_0, v0_1a, c1_5a));
                    c1_5b = fma(d5_1, v1_1b, fma(d5_0, v0_1b, c1_5b));
                    c1_5c = fma(d5_1, v1_1c, fma(d5_0, v0_1c, c1_5c));
                    let r6 = min(t.m0 + 6u, P.rows - 1u) * ohw;
                    let d6_0 = vec3<f32>(a[r6 + pix]);
                    let d6_1 = vec3<f32>(select(0.0, a[r6 + pix1], live1));
                    c0_6a = fma(d6_1, v1_0a, fma(d6_0, v0_0a, c0_6a));
                    c0_6b = fma(d6_1, v1_0b, fma(d6_0, v0_0b, c0_6b));
                    c0_6c = fma(d6_1, v1_0c, fma(d6_0, v0_0c, c0_6c));
                    c1_6a = fma(d6_1, v1_1a, fma(d6_0, v0_1a, c1_6a));
                    c1_6b = fma(d6_1, v1_1b, fma(d6_0, v0_1b, c1_6b));
                    c1_6c = fma(d6_1, v1_1c, fma(d6_0, v0_1c, c1_6c));
                    let r7 = min(t.m0 + 7u, P.rows - 1u) * ohw;
                    let d7_0 = vec3<f32>(a[r7 + pix]);
                    let d7_1 = vec3<f32>(select(0.0, a[r7 + pix1], live1));
                    c0_7a = fma(d7_1, v1_0a, fma(d7_0, v0_0a, c0_7a));
                    c0_7b = fma(d7_1, v1_0b, fma(d7_0, v0_0b, c0_7b));
                    c0_7c = fma(d7_1, v1_0c, fma(d7_0, v0_0c, c0_7c));
                    c1_7a = fma(d7_1, v1_1a, fma(d7_0, v0_1a, c1_7a));
                    c1_7b = fma(d7_1, v1_1b, fma(d7_0, v0_1b, c1_7b));
                    c1_7c = fma(d7_1, v1_1c, fma(d7_0, v0_1c, c1_7c));
                    let r8 = min(t.m0 + 8u, P.rows - 1u) * ohw;
                    let d8_0 = vec3<f32>(a[r8 + pix]);
                    let d8_1 = vec3<f32>(select(0.0, a[r8 + pix1], live1));
                    c0_8a = fma(d8_1, v1_0a, fma(d8_0, v0_0a, c0_8a));
                    c0_8b = fma(d8_1, v1_0b, fma(d8_0, v0_0b, c0_8b));
                    c0_8c = fma(d8_1, v1_0c, fma(d8_0, v0_0c, c0_8c));
                    c1_8a = fma(d8_1, v1_1a, fma(d8_0, v0_1a, c1_8a));
                    c1_8b = fma(d8_1, v1_1b, fma(d8_0, v0_1b, c1_8b));
                    c1_8c = fma(d8_1, v1_1c, fma(d8_0, v0_1c, c1_8c));
                    let r9 = min(t.m0 + 9u, P.rows - 1u) * ohw;
                    let d9_0 = vec3<f32>(a[r9 + pix]);
                    let d9_1 = vec3<f32>(select(0.0, a[r9 + pix1], live1));
                    c0_9a = fma(d9_1, v1_0a, fma(d9_0, v0_0a, c0_9a));
                    c0_9b = fma(d9_1, v1_0b, fma(d9_0, v0_0b, c0_9b));
                    c0_9c = fma(d9_1, v1_0c, fma(d9_0, v0_0c, c0_9c));
                    c1_9a = fma(d9_1, v1_1a, fma(d9_0, v0_1a, c1_9a));
                    c1_9b = fma(d9_1, v1_1b, fma(d9_0, v0_1b, c1_9b));
                    c1_9c = fma(d9_1, v1_1c, fma(d9_0, v0_1c, c1_9c));
                    let r10 = min(t.m0 + 10u, P.rows - 1u) * ohw;
                    let d10_0 = vec3<f32>(a[r10 + pix]);
                    let d10_1 = vec3<f32>(select(0.0, a[r10 + pix1], live1));
                    c0_10a = fma(d10_1, v1_0a, fma(d10_0, v0_0a, c0_10a));
                    c0_10b = fma(d10_1, v1_0b, fma(d10_0, v0_0b, c0_10b));
                    c0_10c = fma(d10_1, v1_0c, fma(d10_0, v0_0c, c0_10c));
                    c1_10a = fma(d10_1, v1_1a, fma(d10_0, v0_1a, c1_10a));
                    c1_10b = fma(d10_1, v1_1b, fma(d10_0, v0_1b, c1_10b));
                    c1_10c = fma(d10_1, v1_1c, fma(d10_0, v0_1c, c1_10c));
                    let r11 = min(t.m0 + 11u, P.rows - 1u) * ohw;
                    let d11_0 = vec3<f32>(a[r11 + pix]);
                    let d11_1 = vec3<f32>(select(0.0, a[r11 + pix1], live1));
                    c0_11a = fma(d11_1, v1_0a, fma(d11_0, v0_0a, c0_11a));
                    c0_11b = fma(d11_1, v1_0b, fma(d11_0, v0_0b, c0_11b));
                    c0_11c = fma(d11_1, v1_0c, fma(d11_0, v0_0c, c0_11c));
                    c1_11a = fma(d11_1, v1_1a, fma(d11_0, v0_1a, c1_11a));
                    c1_11b = fma(d11_1, v1_1b, fma(d11_0, v0_1b, c1_11b));
                    c1_11c = fma(d11_1, v1_1c, fma(d11_0, v0_1c, c1_11c));
                    let r12 = min(t.m0 + 12u, P.rows - 1u) * ohw;
                    let d12_0 = vec3<f32>(a[r12 + pix]);
                    let d12_1 = vec3<f32>(select(0.0, a[r12 + pix1], live1));
                    c0_12a = fma(d12_1, v1_0a, fma(d12_0, v0_0a, c0_12a));
                    c0_12b = fma(d12_1, v1_0b, fma(d12_0, v0_0b, c0_12b));
                    c0_12c = fma(d12_1, v1_0c, fma(d12_0, v0_0c, c0_12c));
                    c1_12a = fma(d12_1, v1_1a, fma(d12_0, v0_1a, c1_12a));
                    c1_12b = fma(d12_1, v1_1b, fma(d12_0, v0_1b, c1_12b));
                    c1_12c = fma(d12_1, v1_1c, fma(d12_0, v0_1c, c1_12c));
                    let r13 = min(t.m0 + 13u, P.rows - 1u) * ohw;
                    let d13_0 = vec3<f32>(a[r13 + pix]);
                    let d13_1 = vec3<f32>(select(0.0, a[r13 + pix1], live1));
                    c0_13a = fma(d13_1, v1_0a, fma(d13_0, v0_0a, c0_13a));
                    c0_13b = fma(d13_1, v1_0b, fma(d13_0, v0_0b, c0_13b));
                    c0_13c = fma(d13_1, v1_0c, fma(d13_0, v0_0c, c0_13c));
                    c1_13a = fma(d13_1, v1_1a, fma(d13_0, v0_1a, c1_13a));
                    c1_13b = fma(d13_1, v1_1b, fma(d13_0, v0_1b, c1_13b));
                    c1_13c = fma(d13_1, v1_1c, fma(d13_0, v0_1c, c1_13c));
                    let r14 = min(t.m0 + 14u, P.rows - 1u) * ohw;
                    let d14_0 = vec3<f32>(a[r14 + pix]);
                    let d14_1 = vec3<f32>(select(0.0, a[r14 + pix1], live1));
                    c0_14a = fma(d14_1, v1_0a, fma(d14_0, v0_0a, c0_14a));
                    c0_14b = fma(d14_1, v1_0b, fma(d14_0, v0_0b, c0_14b));
                    c0_14c = fma(d14_1, v1_0c, fma(d14_0, v0_0c, c0_14c));
                    c1_14a = fma(d14_1, v1_1a, fma(d14_0, v0_1a, c1_14a));
                    c1_14b = fma(d14_1, v1_1b, fma(d14_0, v0_1b, c1_14b));
                    c1_14c = fma(d14_1, v1_1c, fma(d14_0, v0_1c, c1_14c));
                    let r15 = min(t.m0 + 15u, P.rows - 1u) * ohw;
                    let d15_0 = vec3<f32>(a[r15 + pix]);
                    let d15_1 = vec3<f32>(select(0.0, a[r15 + pix1], live1));
                    c0_15a = fma(d15_1, v1_0a, fma(d15_0, v0_0a, c0_15a));
                    c0_15b = fma(d15_1, v1_0b, fma(d15_0, v0_0b, c0_15b));
                    c0_15c = fma(d15_1, v1_0c, fma(d15_0, v0_0c, c0_15c));
                    c1_15a = fma(d15_1, v1_1a, fma(d15_0, v0_1a, c1_15a));
                    c1_15b = fma(d15_1, v1_1b, fma(d15_0, v0_1b, c1_15b));
                    c1_15c = fma(d15_1, v1_1c, fma(d15_0, v0_1c, c1_15c));
                }
                x0_0_0 = x0_0_2;
                x0_0_1 = x0_0_3;
                x0_1_0 = x0_1_2;
                x0_1_1 = x0_1_3;
                x0_2_0 = x0_2_2;
                x0_2_1 = x0_2_3;
                x1_0_0 = x1_0_2;
                x1_0_1 = x1_0_3;
                x1_1_0 = x1_1_2;
                x1_1_1 = x1_1_3;
                x1_2_0 = x1_2_2;
                x1_2_1 = x1_2_3;
                pix = pix + 2u;
            }
        }
    }
    wgrad3_store(t, 0u, 0u, c0_0a, c0_0b, c0_0c);
    wgrad3_store(t, 0u, 1u, c0_1a, c0_1b, c0_1c);
    wgrad3_store(t, 0u, 2u, c0_2a, c0_2b, c0_2c);
    wgrad3_store(t, 0u, 3u, c0_3a, c0_3b, c0_3c);
    wgrad3_store(t, 0u, 4u, c0_4a, c0_4b, c0_4c);
    wgrad3_store(t, 0u, 5u, c0_5a, c0_5b, c0_5c);
    wgrad3_store(t, 0u, 6u, c0_6a, c0_6b, c0_6c);
    wgrad3_store(t, 0u, 7u, c0_7a, c0_7b, c0_7c);
    wgrad3_store(t, 0u, 8u, c0_8a, c0_8b, c0_8c);
    wgrad3_store(t, 0u, 9u, c0_9a, c0_9b, c0_9c);
    wgrad3_store(t, 0u, 10u, c0_10a, c0_10b, c0_10c);
    wgrad3_store(t, 0u, 11u, c0_11a, c0_11b, c0_11c);
    wgrad3_store(t, 0u, 12u, c0_12a, c0_12b, c0_12c);
    wgrad3_store(t, 0u, 13u, c0_13a, c0_13b, c0_13c);
    wgrad3_store(t, 0u, 14u, c0_14a, c0_14b, c0_14c);
    wgrad3_store(t, 0u, 15u, c0_15a, c0_15b, c0_15c);
    wgrad3_store(t, 1u, 0u, c1_0a, c1_0b, c1_0c);
    wgrad3_store(t, 1u, 1u, c1_1a, c1_1b, c1_1c);
    wgrad3_store(t, 1u, 2u, c1_2a, c1_2b, c1_2c);
    wgrad3_store(t, 1u, 3u, c1_3a, c1_3b, c1_3c);
    wgrad3_store(t, 1u, 4u, c1_4a, c1_4b, c1_4c);
    wgrad3_store(t, 1u, 5u, c1_5a, c1_5b, c1_5c);
    wgrad3_store(t, 1u, 6u, c1_6a, c1_6b, c1_6c);
    wgrad3_store(t, 1u, 7u, c1_7a, c1_7b, c1_7c);
    wgrad3_store(t, 1u, 8u, c1_8a, c1_8b, c1_8c);
    wgrad3_store(t, 1u, 9u, c1_9a, c1_9b, c1_9c);
    wgrad3_store(t, 1u, 10u, c1_10a, c1_10b, c1_10c);
    wgrad3_store(t, 1u, 11u, c1_11a, c1_11b, c1_11c);
    wgrad3_store(t, 1u, 12u, c1_12a, c1_12b, c1_12c);
    wgrad3_store(t, 1u, 13u, c1_13a, c1_13b, c1_13c);
    wgrad3_store(t, 1u, 14u, c1_14a, c1_14b, c1_14c);
    wgrad3_store(t, 1u, 15u, c1_15a, c1_15b, c1_15c);
}

@compute @workgroup_size(MM_WG)
fn conv_wgrad3_sg4(@builtin(local_invocation_index) li: u32,
                   @builtin(workgroup_id) wid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>,
                   @builtin(subgroup_invocation_id) lane: u32,
                   @builtin(subgroup_size) sg_size: u32) {
    let id = wid.x + wid.y * nwg.x;
    if (id >= P.count) {
        return;
    }
    var t: Tile;
    t.live = true;
    t.bt = 0u;
    t.m0 = (id / P.ctiles) * 16u;
    t.n0 = ((id % P.ctiles) * MM_WG + li) * 2u;
    let share = lanes_share(sg_size);
    let c0 = t.n0;
    let ohw = P.oh * P.ow;
    let hw = P.h * P.w;
    let r_lo = min(t.m0 + (lane & 7u), P.rows - 1u) * ohw;
    let r_hi = min(t.m0 + 8u + (lane & 7u), P.rows - 1u) * ohw;
    var c0_0a = vec3<f32>(0.0);
    var c0_0b = vec3<f32>(0.0);
    var c0_0c = vec3<f32>(0.0);
    var c0_1a = vec3<f32>(0.0);
    var c0_1b = vec3<f32>(0.0);
    var c0_1c = vec3<f32>(0.0);
    var c0_2a = vec3<f32>(0.0);
    var c0_2b = vec3<f32>(0.0);
    var c0_2c = vec3<f32>(0.0);
    var c0_3a = vec3<f32>(0.0);
    var c0_3b = vec3<f32>(0.0);
    var c0_3c = vec3<f32>(0.0);
    var c0_4a = vec3<f32>(0.0);
    var c0_4b = vec3<f32>(0.0);
    var c0_4c = vec3<f32>(0.0);
    var c0_5a = vec3<f32>(0.0);
    var c0_5b = vec3<f32>(0.0);
    var c0_5c = vec3<f32>(0.0);
    var c0_6a = vec3<f32>(0.0);
    var c0_6b = vec3<f32>(0.0);
    var c0_6c = vec3<f32>(0.0);
    var c0_7a = vec3<f32>(0.0);
    var c0_7b = vec3<f32>(0.0);
    var c0_7c = vec3<f32>(0.0);
    var c0_8a = vec3<f32>(0.0);
    var c0_8b = vec3<f32>(0.0);
    var c0_8c = vec3<f32>(0.0);
    var c0_9a = vec3<f32>(0.0);
    var c0_9b = vec3<f32>(0.0);
    var c0_9c = vec3<f32>(0.0);
    var c0_10a = vec3<f32>(0.0);
    var c0_10b = vec3<f32>(0.0);
    var c0_10c = vec3<f32>(0.0);
    var c0_11a = vec3<f32>(0.0);
    var c0_11b = vec3<f32>(0.0);
    var c0_11c = vec3<f32>(0.0);
    var c0_12a = vec3<f32>(0.0);
    var c0_12b = vec3<f32>(0.0);
    var c0_12c = vec3<f32>(0.0);
    var c0_13a = vec3<f32>(0.0);
    var c0_13b = vec3<f32>(0.0);
    var c0_13c = vec3<f32>(0.0);
    var c0_14a = vec3<f32>(0.0);
    var c0_14b = vec3<f32>(0.0);
    var c0_14c = vec3<f32>(0.0);
    var c0_15a = vec3<f32>(0.0);
    var c0_15b = vec3<f32>(0.0);
    var c0_15c = vec3<f32>(0.0);
    var c1_0a = vec3<f32>(0.0);
    var c1_0b = vec3<f32>(0.0);
    var c1_0c = vec3<f32>(0.0);
    var c1_1a = vec3<f32>(0.0);
    var c1_1b = vec3<f32>(0.0);
    var c1_1c = vec3<f32>(0.0);
    var c1_2a = vec3<f32>(0.0);
    var c1_2b = vec3<f32>(0.0);
    var c1_2c = vec3<f32>(0.0);
    var c1_3a = vec3<f32>(0.0);
    var c1_3b = vec3<f32>(0.0);
    var c1_3c = vec3<f32>(0.0);
    var c1_4a = vec3<f32>(0.0);
    var c1_4b = vec3<f32>(0.0);
    var c1_4c = vec3<f32>(0.0);
    var c1_5a = vec3<f32>(0.0);
    var c1_5b = vec3<f32>(0.0);
    var c1_5c = vec3<f32>(0.0);
    var c1_6a = vec3<f32>(0.0);
    var c1_6b = vec3<f32>(0.0);
    var c1_6c = vec3<f32>(0.0);
    var c1_7a = vec3<f32>(0.0);
    var c1_7b = vec3<f32>(0.0);
    var c1_7c = vec3<f32>(0.0);
    var c1_8a = vec3<f32>(0.0);
    var c1_8b = vec3<f32>(0.0);
    var c1_8c = vec3<f32>(0.0);
    var c1_9a = vec3<f32>(0.0);
    var c1_9b = vec3<f32>(0.0);
    var c1_9c = vec3<f32>(0.0);
    var c1_10a = vec3<f32>(0.0);
    var c1_10b = vec3<f32>(0.0);
    var c1_10c = vec3<f32>(0.0);
    var c1_11a = vec3<f32>(0.0);
    var c1_11b = vec3<f32>(0.0);
    var c1_11c = vec3<f32>(0.0);
    var c1_12a = vec3<f32>(0.0);
    var c1_12b = vec3<f32>(0.0);
    var c1_12c = vec3<f32>(0.0);
    var c1_13a = vec3<f32>(0.0);
    var c1_13b = vec3<f32>(0.0);
    var c1_13c = vec3<f32>(0.0);
    var c1_14a = vec3<f32>(0.0);
    var c1_14b = vec3<f32>(0.0);
    var c1_14c = vec3<f32>(0.0);
    var c1_15a = vec3<f32>(0.0);
    var c1_15b = vec3<f32>(0.0);
    var c1_15c = vec3<f32>(0.0);
    for (var n = 0u; n < P.kout; n = n + 1u) {
        let plane0 = (n * P.cols + min(c0 + 0u, P.cols - 1u)) * hw;
        let plane1 = (n * P.cols + min(c0 + 1u, P.cols - 1u)) * hw;
        for (var oy = 0u; oy < P.oh; oy = oy + 1u) {
            let iy0 = i32(oy * P.sh) - i32(P.ph);
            let iy1 = iy0 + i32(P.dh);
            let iy2 = iy1 + i32(P.dh);
            let ok0 = iy0 >= 0 && iy0 < i32(P.h);
            let ok1 = iy1 >= 0 && iy1 < i32(P.h);
            let ok2 = iy2 >= 0 && iy2 < i32(P.h);
            let row00 = plane0 + u32(max(iy0, 0)) * P.w;
            let row01 = plane0 + u32(max(iy1, 0)) * P.w;
            let row02 = plane0 + u32(max(iy2, 0)) * P.w;
            let row10 = plane1 + u32(max(iy0, 0)) * P.w;
            let row11 = plane1 + u32(max(iy1, 0)) * P.w;
            let row12 = plane1 + u32(max(iy2, 0)) * P.w;
            let ix0 = -i32(P.pw);
            var x0_0_0 = wgrad3_x(row00, ok0, ix0);
            var x0_0_1 = wgrad3_x(row00, ok0, ix0 + 1);
            var x0_1_0 = wgrad3_x(row01, ok1, ix0);
            var x0_1_1 = wgrad3_x(row01, ok1, ix0 + 1);
            var x0_2_0 = wgrad3_x(row02, ok2, ix0);
            var x0_2_1 = wgrad3_x(row02, ok2, ix0 + 1);
            var x1_0_0 = wgrad3_x(row10, ok0, ix0);
            var x1_0_1 = wgrad3_x(row10, ok0, ix0 + 1);
            var x1_1_0 = wgrad3_x(row11, ok1, ix0);
            var x1_1_1 = wgrad3_x(row11, ok1, ix0 + 1);
            var x1_2_0 = wgrad3_x(row12, ok2, ix0);
            var x1_2_1 = wgrad3_x(row12, ok2, ix0 + 1);
            var pix = n * P.a_ko + oy * P.ow;
            for (var ox = 0u; ox < P.ow; ox = ox + 4u) {
                // Columns ox + j, j < 4: live{j} unless past OW (the last step of a row); a column
                // past OW takes zero dy and zero inputs (no 0 * inf).
                let live1 = ox + 1u < P.ow;
                let live2 = ox + 2u < P.ow;
                let live3 = ox + 3u < P.ow;
                let ix = i32(ox) + ix0 + 2;
                let x0_0_2 = wgrad3_x(row00, ok0, ix + 0);
                let x0_0_3 = wgrad3_x(row00, ok0, ix + 1);
                let x0_0_4 = wgrad3_x(row00, ok0, ix + 2);
                let x0_0_5 = wgrad3_x(row00, ok0, ix + 3);
                let x0_1_2 = wgrad3_x(row01, ok1, ix + 0);
                let x0_1_3 = wgrad3_x(row01, ok1, ix + 1);
                let x0_1_4 = wgrad3_x(row01, ok1, ix + 2);
                let x0_1_5 = wgrad3_x(row01, ok1, ix + 3);
                let x0_2_2 = wgrad3_x(row02, ok2, ix + 0);
                let x0_2_3 = wgrad3_x(row02, ok2, ix + 1);
                let x0_2_4 = wgrad3_x(row02, ok2, ix + 2);
                let x0_2_5 = wgrad3_x(row02, ok2, ix + 3);
                let x1_0_2 = wgrad3_x(row10, ok0, ix + 0);
                let x1_0_3 = wgrad3_x(row10, ok0, ix + 1);
                let x1_0_4 = wgrad3_x(row10, ok0, ix + 2);
                let x1_0_5 = wgrad3_x(row10, ok0, ix + 3);
                let x1_1_2 = wgrad3_x(row11, ok1, ix + 0);
                let x1_1_3 = wgrad3_x(row11, ok1, ix + 1);
                let x1_1_4 = wgrad3_x(row11, ok1, ix + 2);
                let x1_1_5 = wgrad3_x(row11, ok1, ix + 3);
                let x1_2_2 = wgrad3_x(row12, ok2, ix + 0);
                let x1_2_3 = wgrad3_x(row12, ok2, ix + 1);
                let x1_2_4 = wgrad3_x(row12, ok2, ix + 2);
                let x1_2_5 = wgrad3_x(row12, ok2, ix + 3);
                let pix1 = pix + select(0u, 1u, live1);
                let pix2 = pix + select(0u, 2u, live2);
                let pix3 = pix + select(0u, 3u, live3);
                let v0_0a = vec3<f32>(x0_0_0, x0_0_1, x0_0_2);
                let v0_0b = vec3<f32>(x0_1_0, x0_1_1, x0_1_2);
                let v0_0c = vec3<f32>(x0_2_0, x0_2_1, x0_2_2);
                let v0_1a = vec3<f32>(x1_0_0, x1_0_1, x1_0_2);
                let v0_1b = vec3<f32>(x1_1_0, x1_1_1, x1_1_2);
                let v0_1c = vec3<f32>(x1_2_0, x1_2_1, x1_2_2);
                let v1_0a = select(vec3<f32>(0.0), vec3<f32>(x0_0_1, x0_0_2, x0_0_3), live1);
                let v1_0b = select(vec3<f32>(0.0), vec3<f32>(x0_1_1, x0_1_2, x0_1_3), live1);
                let v1_0c = select(vec3<f32>(0.0), vec3<f32>(x0_2_1, x0_2_2, x0_2_3), live1);
                let v1_1a = select(vec3<f32>(0.0), vec3<f32>(x1_0_1, x1_0_2, x1_0_3), live1);
                let v1_1b = select(vec3<f32>(0.0), vec3<f32>(x1_1_1, x1_1_2, x1_1_3), live1);
                let v1_1c = select(vec3<f32>(0.0), vec3<f32>(x1_2_1, x1_2_2, x1_2_3), live1);
                let v2_0a = select(vec3<f32>(0.0), vec3<f32>(x0_0_2, x0_0_3, x0_0_4), live2);
                let v2_0b = select(vec3<f32>(0.0), vec3<f32>(x0_1_2, x0_1_3, x0_1_4), live2);
                let v2_0c = select(vec3<f32>(0.0), vec3<f32>(x0_2_2, x0_2_3, x0_2_4), live2);
                let v2_1a = select(vec3<f32>(0.0), vec3<f32>(x1_0_2, x1_0_3, x1_0_4), live2);
                let v2_1b = select(vec3<f32>(0.0), vec3<f32>(x1_1_2, x1_1_3, x1_1_4), live2);
                let v2_1c = select(vec3<f32>(0.0), vec3<f32>(x1_2_2, x1_2_3, x1_2_4), live2);
                let v3_0a = select(vec3<f32>(0.0), vec3<f32>(x0_0_3, x0_0_4, x0_0_5), live3);
                let v3_0b = select(vec3<f32>(0.0), vec3<f32>(x0_1_3, x0_1_4, x0_1_5), live3);
                let v3_0c = select(vec3<f32>(0.0), vec3<f32>(x0_2_3, x0_2_4, x0_2_5), live3);
                let v3_1a = select(vec3<f32>(0.0), vec3<f32>(x1_0_3, x1_0_4, x1_0_5), live3);
                let v3_1b = select(vec3<f32>(0.0), vec3<f32>(x1_1_3, x1_1_4, x1_1_5), live3);
                let v3_1c = select(vec3<f32>(0.0), vec3<f32>(x1_2_3, x1_2_4, x1_2_5), live3);
                if (share) {
                    let lo0 = a[r_lo + pix];
                    let hi0 = a[r_hi + pix];
                    let lo1 = select(0.0, a[r_lo + pix1], live1);
                    let hi1 = select(0.0, a[r_hi + pix1], live1);
                    let lo2 = select(0.0, a[r_lo + pix2], live2);
                    let hi2 = select(0.0, a[r_hi + pix2], live2);
                    let lo3 = select(0.0, a[r_lo + pix3], live3);
                    let hi3 = select(0.0, a[r_hi + pix3], live3);
                    let d0_0 = vec3<f32>(subgroupBroadcast(lo0, 0u));
                    let d0_1 = vec3<f32>(subgroupBroadcast(lo1, 0u));
                    let d0_2 = vec3<f32>(subgroupBroadcast(lo2, 0u));
                    let d0_3 = vec3<f32>(subgroupBroadcast(lo3, 0u));
                    c0_0a = fma(d0_3, v3_0a, fma(d0_2, v2_0a, fma(d0_1, v1_0a, fma(d0_0, v0_0a, c0_0a))));
                    c0_0b = fma(d0_3, v3_0b, fma(d0_2, v2_0b, fma(d0_1, v1_0b, fma(d0_0, v0_0b, c0_0b))));
                    c0_0c = fma(d0_3, v3_0c, fma(d0_2, v2_0c, fma(d0_1, v1_0c, fma(d0_0, v0_0c, c0_0c))));
                    c1_0a = fma(d0_3, v3_1a, fma(d0_2, v2_1a, fma(d0_1, v1_1a, fma(d0_0, v0_1a, c1_0a))));
                    c1_0b = fma(d0_3, v3_1b, fma(d0_2, v2_1b, fma(d0_1, v1_1b, fma(d0_0, v0_1b, c1_0b))));
                    c1_0c = fma(d0_3, v3_1c, fma(d0_2, v2_1c, fma(d0_1, v1_1c, fma(d0_0, v0_1c, c1_0c))));
                    let d1_0 = vec3<f32>(subgroupBroadcast(lo0, 1u));
                    let d1_1 = vec3<f32>(subgroupBroadcast(lo1, 1u));
                    let d1_2 = vec3<f32>(subgroupBroadcast(lo2, 1u));
                    let d1_3 = vec3<f32>(subgroupBroadcast(lo3, 1u));
                    c0_1a = fma(d1_3, v3_0a, fma(d1_2, v2_0a, fma(d1_1, v1_0a, fma(d1_0, v0_0a, c0_1a))));
                    c0_1b = fma(d1_3, v3_0b, fma(d1_2, v2_0b, fma(d1_1, v1_0b, fma(d1_0, v0_0b, c0_1b))));
                    c0_1c = fma(d1_3, v3_0c, fma(d1_2, v2_0c, fma(d1_1, v1_0c, fma(d1_0, v0_0c, c0_1c))));
                    c1_1a = fma(d1_3, v3_1a, fma(d1_2, v2_1a, fma(d1_1, v1_1a, fma(d1_0, v0_1a, c1_1a))));
                    c1_1b = fma(d1_3, v3_1b, fma(d1_2, v2_1b, fma(d1_1, v1_1b, fma(d1_0, v0_1b, c1_1b))));
                    c1_1c = fma(d1_3, v3_1c, fma(d1_2, v2_1c, fma(d1_1, v1_1c, fma(d1_0, v0_1c, c1_1c))));
                    let d2_0 = vec3<f32>(subgroupBroadcast(lo0, 2u));
                    let d2_1 = vec3<f32>(subgroupBroadcast(lo1, 2u));
                    let d2_2 = vec3<f32>(subgroupBroadcast(lo2, 2u));
                    let d2_3 = vec3<f32>(subgroupBroadcast(lo3, 2u));
                    c0_2a = fma(d2_3, v3_0a, fma(d2_2, v2_0a, fma(d2_1, v1_0a, fma(d2_0, v0_0a, c0_2a))));
                    c0_2b = fma(d2_3, v3_0b, fma(d2_2, v2_0b, fma(d2_1, v1_0b, fma(d2_0, v0_0b, c0_2b))));
                    c0_2c = fma(d2_3, v3_0c, fma(d2_2, v2_0c, fma(d2_1, v1_0c, fma(d2_0, v0_0c, c0_2c))));
                    c1_2a = fma(d2_3, v3_1a, fma(d2_2, v2_1a, fma(d2_1, v1_1a, fma(d2_0, v0_1a, c1_2a))));
                    c1_2b = fma(d2_3, v3_1b, fma(d2_2, v2_1b, fma(d2_1, v1_1b, fma(d2_0, v0_1b, c1_2b))));
                    c1_2c = fma(d2_3, v3_1c, fma(d2_2, v2_1c, fma(d2_1, v1_1c, fma(d2_0, v0_1c, c1_2c))));
                    let d3_0 = vec3<f32>(subgroupBroadcast(lo0, 3u));
                    let d3_1 = vec3<f32>(subgroupBroadcast(lo1, 3u));
                    let d3_2 = vec3<f32>(subgroupBroadcast(lo2, 3u));
                    let d3_3 = vec3<f32>(subgroupBroadcast(lo3, 3u));
                    c0_3a = fma(d3_3, v3_0a, fma(d3_2, v2_0a, fma(d3_1, v1_0a, fma(d3_0, v0_0a, c0_3a))));
                    c0_3b = fma(d3_3, v3_0b, fma(d3_2, v2_0b, fma(d3_1, v1_0b, fma(d3_0, v0_0b, c0_3b))));
                    c0_3c = fma(d3_3, v3_0c, fma(d3_2, v2_0c, fma(d3_1, v1_0c, fma(d3_0, v0_0c, c0_3c))));
                    c1_3a = fma(d3_3, v3_1a, fma(d3_2, v2_1a, fma(d3_1, v1_1a, fma(d3_0, v0_1a, c1_3a))));
                    c1_3b = fma(d3_3, v3_1b, fma(d3_2, v2_1b, fma(d3_1, v1_1b, fma(d3_0, v0_1b, c1_3b))));
                    c1_3c = fma(d3_3, v3_1c, fma(d3_2, v2_1c, fma(d3_1, v1_1c, fma(d3_0, v0_1c, c1_3c))));
                    let d4_0 = vec3<f32>(subgroupBroadcast(lo0, 4u));
                    let d4_1 = vec3<f32>(subgroupBroadcast(lo1, 4u));
                    let d4_2 = vec3<f32>(subgroupBroadcast(lo2, 4u));
                    let d4_3 = vec3<f32>(subgroupBroadcast(lo3, 4u));
                    c0_4a = fma(d4_3, v3_0a, fma(d4_2, v2_0a, fma(d4_1, v1_0a, fma(d4_0, v0_0a, c0_4a))));
                    c0_4b = fma(d4_3, v3_0b, fma(d4_2, v2_0b, fma(d4_1, v1_0b, fma(d4_0, v0_0b, c0_4b))));
                    c0_4c = fma(d4_3, v3_0c, fma(d4_2, v2_0c, fma(d4_1, v1_0c, fma(d4_0, v0_0c, c0_4c))));
                    c1_4a = fma(d4_3, v3_1a, fma(d4_2, v2_1a, fma(d4_1, v1_1a, fma(d4_0, v0_1a, c1_4a))));
                    c1_4b = fma(d4_3, v3_1b, fma(d4_2, v2_1b, fma(d4_1, v1_1b, fma(d4_0, v0_1b, c1_4b))));
                    c1_4c = fma(d4_3, v3_1c, fma(d4_2, v2_1c, fma(d4_1, v1_1c, fma(d4_0, v0_1c, c1_4c))));
                    let d5_0 = vec3<f32>(subgroupBroadcast(lo0, 5u));
                    let d5_1 = vec3<f32>(subgroupBroadcast(lo1, 5u));
                    let d5_2 = vec3<f32>(subgroupBroadcast(lo2, 5u));
                    let d5_3 = vec3<f32>(subgroupBroadcast(lo3, 5u));
                    c0_5a = fma(d5_3, v3_0a, fma(d5_2, v2_0a, fma(d5_1, v1_0a, fma(d5_0, v0_0a, c0_5a))));
                    c0_5b = fma(d5_3, v3_0b, fma(d5_2, v2_0b, fma(d5_1, v1_0b, fma(d5_0, v0_0b, c0_5b))));
                    c0_5c = fma(d5_3, v3_0c, fma(d5_2, v2_0c, fma(d5_1, v1_0c, fma(d5_0, v0_0c, c0_5c))));
                    c1_5a = fma(d5_3, v3_1a, fma(d5_2, v2_1a, fma(d5_1, v1_1a, fma(d5_0, v0_1a, c1_5a))));
                    c1_5b = fma(d5_3, v3_1b, fma(d5_2, v2_1b, fma(d5_1, v1_1b, fma(d5_0, v0_1b, c1_5b))));
                    c1_5c = fma(d5_3, v3_1c, fma(d5_2, v2_1c, fma(d5_1, v1_1c, fma(d5_0, v0_1c, c1_5c))));
                    let d6_0 = vec3<f32>(subgroupBroadcast(lo0, 6u));
                    let d6_1 = vec3<f32>(subgroupBroadcast(lo1, 6u));
                    let d6_2 = vec3<f32>(subgroupBroadcast(lo2, 6u));
                    let d6_3 = vec3<f32>(subgroupBroadcast(lo3, 6u));
                    c0_6a = fma(d6_3, v3_0a, fma(d6_2, v2_0a, fma(d6_1, v1_0a, fma(d6_0, v0_0a, c0_6a))));
                    c0_6b = fma(d6_3, v3_0b, fma(d6_2, v2_0b, fma(d6_1, v1_0b, fma(d6_0, v0_0b, c0_6b))));
                    c0_6c = fma(d6_3, v3_0c, fma(d6_2, v2_0c, fma(d6_1, v1_0c, fma(d6_0, v0_0c, c0_6c))));
                    c1_6a = fma(d6_3, v3_1a, fma(d6_2, v2_1a, fma(d6_1, v1_1a, fma(d6_0, v0_1a, c1_6a))));
                    c1_6b = fma(d6_3, v3_1b, fma(d6_2, v2_1b, fma(d6_1, v1_1b, fma(d6_0, v0_1b, c1_6b))));
                    c1_6c = fma(d6_3, v3_1c, fma(d6_2, v2_1c, fma(d6_1, v1_1c, fma(d6_0, v0_1c, c1_6c))));
                    let d7_0 = vec3<f32>(subgroupBroadcast(lo0, 7u));
                    let d7_1 = vec3<f32>(subgroupBroadcast(lo1, 7u));
                    let d7_2 = vec3<f32>(subgroupBroadcast(lo2, 7u));
                    let d7_3 = vec3<f32>(subgroupBroadcast(lo3, 7u));
                    c0_7a = fma(d7_3, v3_0a, fma(d7_2, v2_0a, fma(d7_1, v1_0a, fma(d7_0, v0_0a, c0_7a))));
                    c0_7b = fma(d7_3, v3_0b, fma(d7_2, v2_0b, fma(d7_1, v1_0b, fma(d7_0, v0_0b, c0_7b))));
                    c0_7c = fma(d7_3, v3_0c, fma(d7_2, v2_0c, fma(d7_1, v1_0c, fma(d7_0, v0_0c, c0_7c))));
                    c1_7a = fma(d7_3, v3_1a, fma(d7_2, v2_1a, fma(d7_1, v1_1a, fma(d7_0, v0_1a, c1_7a))));
                    c1_7b = fma(d7_3, v3_1b, fma(d7_2, v2_1b, fma(d7_1, v1_1b, fma(d7_0, v0_1b, c1_7b))));
                    c1_7c = fma(d7_3, v3_1c, fma(d7_2, v2_1c, fma(d7_1, v1_1c, fma(d7_0, v0_1c, c1_7c))));
                    let d8_0 = vec3<f32>(subgroupBroadcast(hi0, 0u));
                    let d8_1 = vec3<f32>(subgroupBroadcast(hi1, 0u));
                    let d8_2 = vec3<f32>(subgroupBroadcast(hi2, 0u));
                    let d8_3 = vec3<f32>(subgroupBroadcast(hi3, 0u));
                    c0_8a = fma(d8_3, v3_0a, fma(d8_2, v2_0a, fma(d8_1, v1_0a, fma(d8_0, v0_0a, c0_8a))));
                    c0_8b = fma(d8_3, v3_0b, fma(d8_2, v2_0b, fma(d8_1, v1_0b, fma(d8_0, v0_0b, c0_8b))));
                    c0_8c = fma(d8_3, v3_0c, fma(d8_2, v2_0c, fma(d8_1, v1_0c, fma(d8_0, v0_0c, c0_8c))));
                    c1_8a = fma(d8_3, v3_1a, fma(d8_2, v2_1a, fma(d8_1, v1_1a, fma(d8_0, v0_1a, c1_8a))));
                    c1_8b = fma(d8_3, v3_1b, fma(d8_2, v2_1b, fma(d8_1, v1_1b, fma(d8_0, v0_1b, c1_8b))));
                    c1_8c = fma(d8_3, v3_1c, fma(d8_2, v2_1c, fma(d8_1, v1_1c, fma(d8_0, v0_1c, c1_8c))));
                    let d9_0 = vec3<f32>(subgroupBroadcast(hi0, 1u));
                    let d9_1 = vec3<f32>(subgroupBroadcast(hi1, 1u));
                    let d9_2 = vec3<f32>(subgroupBroadcast(hi2, 1u));
                    let d9_3 = vec3<f32>(subgroupBroadcast(hi3, 1u));
                    c0_9a = fma(d9_3, v3_0a, fma(d9_2, v2_0a, fma(d9_1, v1_0a, fma(d9_0, v0_0a, c0_9a))));
                    c0_9b = fma(d9_3, v3_0b, fma(d9_2, v2_0b, fma(d9_1, v1_0b, fma(d9_0, v0_0b, c0_9b))));
                    c0_9c = fma(d9_3, v3_0c, fma(d9_2, v2_0c, fma(d9_1, v1_0c, fma(d9_0, v0_0c, c0_9c))));
                    c1_9a = fma(d9_3, v3_1a, fma(d9_2, v2_1a, fma(d9_1, v1_1a, fma(d9_0, v0_1a, c1_9a))));
                    c1_9b = fma(d9_3, v3_1b, fma(d9_2, v2_1b, fma(d9_1, v1_1b, fma(d9_0, v0_1b, c1_9b))));
                    c1_9c = fma(d9_3, v3_1c, fma(d9_2, v2_1c, fma(d9_1, v1_1c, fma(d9_0, v0_1c, c1_9c))));
                    let d10_0 = vec3<f32>(subgroupBroadcast(hi0, 2u));
                    let d10_1 = vec3<f32>(subgroupBroadcast(hi1, 2u));
                    let d10_2 = vec3<f32>(subgroupBroadcast(hi2, 2u));
                    let d10_3 = vec3<f32>(subgroupBroadcast(hi3, 2u));
                    c0_10a = fma(d10_3, v3_0a, fma(d10_2, v2_0a, fma(d10_1, v1_0a, fma(d10_0, v0_0a, c0_10a))));
                    c0_10b = fma(d10_3, v3_0b, fma(d10_2, v2_0b, fma(d10_1, v1_0b, fma(d10_0, v0_0b, c0_10b))));
                    c0_10c = fma(d10_3, v3_0c, fma(d10_2, v2_0c, fma(d10_1, v1_0c, fma(d10_0, v0_0c, c0_10c))));
                    c1_10a = fma(d10_3, v3_1a, fma(d10_2, v2_1a, fma(d10_1, v1_1a, fma(d10_0, v0_1a, c1_10a))));
                    c1_10b = fma(d10_3, v3_1b, fma(d10_2, v2_1b, fma(d10_1, v1_1b, fma(d10_0, v0_1b, c1_10b))));
                    c1_10c = fma(d10_3, v3_1c, fma(d10_2, v2_1c, fma(d10_1, v1_1c, fma(d10_0, v0_1c, c1_10c))));
                    let d11_0 = vec3<f32>(subgroupBroadcast(hi0, 3u));
                    let d11_1 = vec3<f32>(subgroupBroadcast(hi1, 3u));
                    let d11_2 = vec3<f32>(subgroupBroadcast(hi2, 3u));
                    let d11_3 = vec3<f32>(subgroupBroadcast(hi3, 3u));
                    c0_11a = fma(d11_3, v3_0a, fma(d11_2, v2_0a, fma(d11_1, v1_0a, fma(d11_0, v0_0a, c0_11a))));
                    c0_11b = fma(d11_3, v3_0b, fma(d11_2, v2_0b, fma(d11_1, v1_0b, fma(d11_0, v0_0b, c0_11b))));
                    c0_11c = fma(d11_3, v3_0c, fma(d11_2, v2_0c, fma(d11_1, v1_0c, fma(d11_0, v0_0c, c0_11c))));
                    c1_11a = fma(d11_3, v3_1a, fma(d11_2, v2_1a, fma(d11_1, v1_1a, fma(d11_0, v0_1a, c1_11a))));
                    c1_11b = fma(d11_3, v3_1b, fma(d11_2, v2_1b, fma(d11_1, v1_1b, fma(d11_0, v0_1b, c1_11b))));
                    c1_11c = fma(d11_3, v3_1c, fma(d11_2, v2_1c, fma(d11_1, v1_1c, fma(d11_0, v0_1c, c1_11c))));
                    let d12_0 = vec3<f32>(subgroupBroadcast(hi0, 4u));
                    let d12_1 = vec3<f32>(subgroupBroadcast(hi1, 4u));
                    let d12_2 = vec3<f32>(subgroupBroadcast(hi2, 4u));
                    let d12_3 = vec3<f32>(subgroupBroadcast(hi3, 4u));
                    c0_12a = fma(d12_3, v3_0a, fma(d12_2, v2_0a, fma(d12_1, v1_0a, fma(d12_0, v0_0a, c0_12a))));
                    c0_12b = fma(d12_3, v3_0b, fma(d12_2, v2_0b, fma(d12_1, v1_0b, fma(d12_0, v0_0b, c0_12b))));
                    c0_12c = fma(d12_3, v3_0c, fma(d12_2, v2_0c, fma(d12_1, v1_0c, fma(d12_0, v0_0c, c0_12c))));
                    c1_12a = fma(d12_3, v3_1a, fma(d12_2, v2_1a, fma(d12_1, v1_1a, fma(d12_0, v0_1a, c1_12a))));
                    c1_12b = fma(d12_3, v3_1b, fma(d12_2, v2_1b, fma(d12_1, v1_1b, fma(d12_0, v0_1b, c1_12b))));
                    c1_12c = fma(d12_3, v3_1c, fma(d12_2, v2_1c, fma(d12_1, v1_1c, fma(d12_0, v0_1c, c1_12c))));
                    let d13_0 = vec3<f32>(subgroupBroadcast(hi0, 5u));
                    let d13_1 = vec3<f32>(subgroupBroadcast(hi1, 5u));
                    let d13_2 = vec3<f32>(subgroupBroadcast(hi2, 5u));
                    let d13_3 = vec3<f32>(subgroupBroadcast(hi3, 5u));
                    c0_13a = fma(d13_3, v3_0a, fma(d13_2, v2_0a, fma(d13_1, v1_0a, fma(d13_0, v0_0a, c0_13a))));
                    c0_13b = fma(d13_3, v3_0b, fma(d13_2, v2_0b, fma(d13_1, v1_0b, fma(d13_0, v0_0b, c0_13b))));
                    c0_13c = fma(d13_3, v3_0c, fma(d13_2, v2_0c, fma(d13_1, v1_0c, fma(d13_0, v0_0c, c0_13c))));
                    c1_13a = fma(d13_3, v3_1a, fma(d13_2, v2_1a, fma(d13_1, v1_1a, fma(d13_0, v0_1a, c1_13a))));
                    c1_13b = fma(d13_3, v3_1b, fma(d13_2, v2_1b, fma(d13_1, v1_1b, fma(d13_0, v0_1b, c1_13b))));
                    c1_13c = fma(d13_3, v3_1c, fma(d13_2, v2_1c, fma(d13_1, v1_1c, fma(d13_0, v0_1c, c1_13c))));
                    let d14_0 = vec3<f32>(subgroupBroadcast(hi0, 6u));
                    let d14_1 = vec3<f32>(subgroupBroadcast(hi1, 6u));
                    let d14_2 = vec3<f32>(subgroupBroadcast(hi2, 6u));
                    let d14_3 = vec3<f32>(subgroupBroadcast(hi3, 6u));
                    c0_14a = fma(d14_3, v3_0a, fma(d14_2, v2_0a, fma(d14_1, v1_0a, fma(d14_0, v0_0a, c0_14a))));
                    c0_14b = fma(d14_3, v3_0b, fma(d14_2, v2_0b, fma(d14_1, v1_0b, fma(d14_0, v0_0b, c0_14b))));
                    c0_14c = fma(d14_3, v3_0c, fma(d14_2, v2_0c, fma(d14_1, v1_0c, fma(d14_0, v0_0c, c0_14c))));
                    c1_14a = fma(d14_3, v3_1a, fma(d14_2, v2_1a, fma(d14_1, v1_1a, fma(d14_0, v0_1a, c1_14a))));
                    c1_14b = fma(d14_3, v3_1b, fma(d14_2, v2_1b, fma(d14_1, v1_1b, fma(d14_0, v0_1b, c1_14b))));
                    c1_14c = fma(d14_3, v3_1c, fma(d14_2, v2_1c, fma(d14_1, v1_1c, fma(d14_0, v0_1c, c1_14c))));
                    let d15_0 = vec3<f32>(subgroupBroadcast(hi0, 7u));
                    let d15_1 = vec3<f32>(subgroupBroadcast(hi1, 7u));
                    let d15_2 = vec3<f32>(subgroupBroadcast(hi2, 7u));
                    let d15_3 = vec3<f32>(subgroupBroadcast(hi3, 7u));
                    c0_15a = fma(d15_3, v3_0a, fma(d15_2, v2_0a, fma(d15_1, v1_0a, fma(d15_0, v0_0a, c0_15a))));
                    c0_15b = fma(d15_3, v3_0b, fma(d15_2, v2_0b, fma(d15_1, v1_0b, fma(d15_0, v0_0b, c0_15b))));
                    c0_15c = fma(d15_3, v3_0c, fma(d15_2, v2_0c, fma(d15_1, v1_0c, fma(d15_0, v0_0c, c0_15c))));
                    c1_15a = fma(d15_3, v3_1a, fma(d15_2, v2_1a, fma(d15_1, v1_1a, fma(d15_0, v0_1a, c1_15a))));
                    c1_15b = fma(d15_3, v3_1b, fma(d15_2, v2_1b, fma(d15_1, v1_1b, fma(d15_0, v0_1b, c1_15b))));
                    c1_15c = fma(d15_3, v3_1c, fma(d15_2, v2_1c, fma(d15_1, v1_1c, fma(d15_0, v0_1c, c1_15c))));
                } else {
                    let r0 = min(t.m0 + 0u, P.rows - 1u) * ohw;
                    let d0_0 = vec3<f32>(a[r0 + pix]);
                    let d0_1 = vec3<f32>(select(0.0, a[r0 + pix1], live1));
                    let d0_2 = vec3<f32>(select(0.0, a[r0 + pix2], live2));
                    let d0_3 = vec3<f32>(select(0.0, a[r0 + pix3], live3));
                    c0_0a = fma(d0_3, v3_0a, fma(d0_2, v2_0a, fma(d0_1, v1_0a, fma(d0_0, v0_0a, c0_0a))));
                    c0_0b = fma(d0_3, v3_0b, fma(d0_2, v2_0b, fma(d0_1, v1_0b, fma(d0_0, v0_0b, c0_0b))));
                    c0_0c = fma(d0_3, v3_0c, fma(d0_2, v2_0c, fma(d0_1, v1_0c, fma(d0_0, v0_0c, c0_0c))));
                    c1_0a = fma(d0_3, v3_1a, fma(d0_2, v2_1a, fma(d0_1, v1_1a, fma(d0_0, v0_1a, c1_0a))));
                    c1_0b = fma(d0_3, v3_1b, fma(d0_2, v2_1b, fma(d0_1, v1_1b, fma(d0_0, v0_1b, c1_0b))));
                    c1_0c = fma(d0_3, v3_1c, fma(d0_2, v2_1c, fma(d0_1, v1_1c, fma(d0_0, v0_1c, c1_0c))));
                    let r1 = min(t.m0 + 1u, P.rows - 1u) * ohw;
                    let d1_0 = vec3<f32>(a[r1 + pix]);
                    let d1_1 = vec3<f32>(select(0.0, a[r1 + pix1], live1));
                    let d1_2 = vec3<f32>(select(0.0, a[r1 + pix2], live2));
                    let d1_3 = vec3<f32>(select(0.0, a[r1 + pix3], live3));
                    c0_1a = fma(d1_3, v3_0a, fma(d1_2, v2_0a, fma(d1_1, v1_0a, fma(d1_0, v0_0a, c0_1a))));
                    c0_1b = fma(d1_3, v3_0b, fma(d1_2, v2_0b, fma(d1_1, v1_0b, fma(d1_0, v0_0b, c0_1b))));
                    c0_1c = fma(d1_3, v3_0c, fma(d1_2, v2_0c, fma(d1_1, v1_0c, fma(d1_0, v0_0c, c0_1c))));
                    c1_1a = fma(d1_3, v3_1a, fma(d1_2, v2_1a, fma(d1_1, v1_1a, fma(d1_0, v0_1a, c1_1a))));
                    c1_1b = fma(d1_3, v3_1b, fma(d1_2, v2_1b, fma(d1_1, v1_1b, fma(d1_0, v0_1b, c1_1b))));
                    c1_1c = fma(d1_3, v3_1c, fma(d1_2, v2_1c, fma(d1_1, v1_1c, fma(d1_0, v0_1c, c1_1c))));
                    let r2 = min(t.m0 + 2u, P.rows - 1u) * ohw;
                    let d2_0 = vec3<f32>(a[r2 + pix]);
                    let d2_1 = vec3<f32>(select(0.0, a[r2 + pix1], live1));
                    let d2_2 = vec3<f32>(select(0.0, a[r2 + pix2], live2));
                    let d2_3 = vec3<f32>(select(0.0, a[r2 + pix3], live3));
                    c0_2a = fma(d2_3, v3_0a, fma(d2_2, v2_0a, fma(d2_1, v1_0a, fma(d2_0, v0_0a, c0_2a))));
                    c0_2b = fma(d2_3, v3_0b, fma(d2_2, v2_0b, fma(d2_1, v1_0b, fma(d2_0, v0_0b, c0_2b))));
                    c0_2c = fma(d2_3, v3_0c, fma(d2_2, v2_0c, fma(d2_1, v1_0c, fma(d2_0, v0_0c, c0_2c))));
                    c1_2a = fma(d2_3, v3_1a, fma(d2_2, v2_1a, fma(d2_1, v1_1a, fma(d2_0, v0_1a, c1_2a))));
                    c1_2b = fma(d2_3, v3_1b, fma(d2_2, v2_1b, fma(d2_1, v1_1b, fma(d2_0, v0_1b, c1_2b))));
                    c1_2c = fma(d2_3, v3_1c, fma(d2_2, v2_1c, fma(d2_1, v1_1c, fma(d2_0, v0_1c, c1_2c))));
                    let r3 = min(t.m0 + 3u, P.rows - 1u) * ohw;
                    let d3_0 = vec3<f32>(a[r3 + pix]);
                    let d3_1 = vec3<f32>(select(0.0, a[r3 + pix1], live1));
                    let d3_2 = vec3<f32>(select(0.0, a[r3 + pix2], live2));
                    let d3_3 = vec3<f32>(select(0.0, a[r3 + pix3], live3));
                    c0_3a = fma(d3_3, v3_0a, fma(d3_2, v2_0a, fma(d3_1, v1_0a, fma(d3_0, v0_0a, c0_3a))));
                    c0_3b = fma(d3_3, v3_0b, fma(d3_2, v2_0b, fma(d3_1, v1_0b, fma(d3_0, v0_0b, c0_3b))));
                    c0_3c = fma(d3_3, v3_0c, fma(d3_2, v2_0c, fma(d3_1, v1_0c, fma(d3_0, v0_0c, c0_3c))));
                    c1_3a = fma(d3_3, v3_1a, fma(d3_2, v2_1a, fma(d3_1, v1_1a, fma(d3_0, v0_1a, c1_3a))));
                    c1_3b = fma(d3_3, v3_1b, fma(d3_2, v2_1b, fma(d3_1, v1_1b, fma(d3_0, v0_1b, c1_3b))));
                    c1_3c = fma(d3_3, v3_1c, fma(d3_2, v2_1c, fma(d3_1, v1_1c, fma(d3_0, v0_1c, c1_3c))));
                    let r4 = min(t.m0 + 4u, P.rows - 1u) * ohw;
                    let d4_0 = vec3<f32>(a[r4 + pix]);
                    let d4_1 = vec3<f32>(select(0.0, a[r4 + pix1], live1));
                    let d4_2 = vec3<f32>(select(0.0, a[r4 + pix2], live2));
                    let d4_3 = vec3<f32>(select(0.0, a[r4 + pix3], live3));
                    c0_4a = fma(d4_3, v3_0a, fma(d4_2, v2_0a, fma(d4_1, v1_0a, fma(d4_0, v0_0a, c0_4a))));
                    c0_4b = fma(d4_3, v3_0b, fma(d4_2, v2_0b, fma(d4_1, v1_0b, fma(d4_0, v0_0b, c0_4b))));
                    c0_4c = fma(d4_3, v3_0c, fma(d4_2, v2_0c, fma(d4_1, v1_0c, fma(d4_0, v0_0c, c0_4c))));
                    c1_4a = fma(d4_3, v3_1a, fma(d4_2, v2_1a, fma(d4_1, v1_1a, fma(d4_0, v0_1a, c1_4a))));
                    c1_4b = fma(d4_3, v3_1b, fma(d4_2, v2_1b, fma(d4_1, v1_1b, fma(d4_0, v0_1b, c1_4b))));
                    c1_4c = fma(d4_3, v3_1c, fma(d4_2, v2_1c, fma(d4_1, v1_1c, fma(d4_0, v0_1c, c1_4c))));
                    let r5 = min(t.m0 + 5u, P.rows - 1u) * ohw;
                    let d5_0 = vec3<f32>(a[r5 + pix]);
                    let d5_1 = vec3<f32>(select(0.0, a[r5 + pix1], live1));
                    let d5_2 = vec3<f32>(select(0.0, a[r5 + pix2], live2));
                    let d5_3 = vec3<f32>(select(0.0, a[r5 + pix3], live3));
                    c0_5a = fma(d5_3, v3_0a, fma(d5_2, v2_0a, fma(d5_1, v1_0a, fma(d5_0, v0_0a, c0_5a))));
                    c0_5b = fma(d5_3, v3_0b, fma(d5_2, v2_0b, fma(d5_1, v1_0b, fma(d5_0, v0_0b, c0_5b))));
                    c0_5c = fma(d5_3, v3_0c, fma(d5_2, v2_0c, fma(d5_1, v1_0c, fma(d5_0, v0_0c, c0_5c))));
                    c1_5a = fma(d5_3, v3_1a, fma(d5_2, v2_1a, fma(d5_1, v1_1a, fma(d5_0, v0_1a, c1_5a))));
                    c1_5b = fma(d5_3, v3_1b, fma(d5_2, v2_1b, fma(d5_1, v1_1b, fma(d5_0, v0_1b, c1_5b))));
                    c1_5c = fma(d5_3, v3_1c, fma(d5_2, v2_1c, fma(d5_1, v1_1c, fma(d5_0, v0_1c, c1_5c))));
                    let r6 = min(t.m0 + 6u, P.rows - 1u) * ohw;
                    let d6_0 = vec3<f32>(a[r6 + pix]);
                    let d6_1 = vec3<f32>(select(0.0, a[r6 + pix1], live1));
                    let d6_2 = vec3<f32>(select(0.0, a[r6 + pix2], live2));
                    let d6_3 = vec3<f32>(select(0.0, a[r6 + pix3], live3));
                    c0_6a = fma(d6_3, v3_0a, fma(d6_2, v2_0a, fma(d6_1, v1_0a, fma(d6_0, v0_0a, c0_6a))));
                    c0_6b = fma(d6_3, v3_0b, fma(d6_2, v2_0b, fma(d6_1, v1_0b, fma(d6_0, v0_0b, c0_6b))));
                    c0_6c = fma(d6_3, v3_0c, fma(d6_2, v2_0c, fma(d6_1, v1_0c, fma(d6_0, v0_0c, c0_6c))));
                    c1_6a = fma(d6_3, v3_1a, fma(d6_2, v2_1a, fma(d6_1, v1_1a, fma(d6_0, v0_1a, c1_6a))));
                    c1_6b = fma(d6_3, v3_1b, fma(d6_2, v2_1b, fma(d6_1, v1_1b, fma(d6_0, v0_1b, c1_6b))));
                    c1_6c = fma(d6_3, v3_1c, fma(d6_2, v2_1c, fma(d6_1, v1_1c, fma(d6_0, v0_1c, c1_6c))));
                    let r7 = min(t.m0 + 7u, P.rows - 1u) * ohw;
                    let d7_0 = vec3<f32>(a[r7 + pix]);
                    let d7_1 = vec3<f32>(select(0.0, a[r7 + pix1], live1));
                    let d7_2 = vec3<f32>(select(0.0, a[r7 + pix2], live2));
                    let d7_3 = vec3<f32>(select(0.0, a[r7 + pix3], live3));
                    c0_7a = fma(d7_3, v3_0a, fma(d7_2, v2_0a, fma(d7_1, v1_0a, fma(d7_0, v0_0a, c0_7a))));
                    c0_7b = fma(d7_3, v3_0b, fma(d7_2, v2_0b, fma(d7_1, v1_0b, fma(d7_0, v0_0b, c0_7b))));
                    c0_7c = fma(d7_3, v3_0c, fma(d7_2, v2_0c, fma(d7_1, v1_0c, fma(d7_0, v0_0c, c0_7c))));
                    c1_7a = fma(d7_3, v3_1a, fma(d7_2, v2_1a, fma(d7_1, v1_1a, fma(d7_0, v0_1a, c1_7a))));
                    c1_7b = fma(d7_3, v3_1b, fma(d7_2, v2_1b, fma(d7_1, v1_1b, fma(d7_0, v0_1b, c1_7b))));
                    c1_7c = fma(d7_3, v3_1c, fma(d7_2, v2_1c, fma(d7_1, v1_1c, fma(d7_0, v0_1c, c1_7c))));
                    let r8 = min(t.m0 + 8u, P.rows - 1u) * ohw;
                    let d8_0 = vec3<f32>(a[r8 + pix]);
                    let d8_1 = vec3<f32>(select(0.0, a[r8 + pix1], live1));
                    let d8_2 = vec3<f32>(select(0.0, a[r8 + pix2], live2));
                    let d8_3 = vec3<f32>(select(0.0, a[r8 + pix3], live3));
                    c0_8a = fma(d8_3, v3_0a, fma(d8_2, v2_0a, fma(d8_1, v1_0a, fma(d8_0, v0_0a, c0_8a))));
                    c0_8b = fma(d8_3, v3_0b, fma(d8_2, v2_0b, fma(d8_1, v1_0b, fma(d8_0, v0_0b, c0_8b))));
                    c0_8c = fma(d8_3, v3_0c, fma(d8_2, v2_0c, fma(d8_1, v1_0c, fma(d8_0, v0_0c, c0_8c))));
                    c1_8a = fma(d8_3, v3_1a, fma(d8_2, v2_1a, fma(d8_1, v1_1a, fma(d8_0, v0_1a, c1_8a))));
                    c1_8b = fma(d8_3, v3_1b, fma(d8_2, v2_1b, fma(d8_1, v1_1b, fma(d8_0, v0_1b, c1_8b))));
                    c1_8c = fma(d8_3, v3_1c, fma(d8_2, v2_1c, fma(d8_1, v1_1c, fma(d8_0, v0_1c, c1_8c))));
                    let r9 = min(t.m0 + 9u, P.rows - 1u) * ohw;
                    let d9_0 = vec3<f32>(a[r9 + pix]);
                    let d9_1 = vec3<f32>(select(0.0, a[r9 + pix1], live1));
                    let d9_2 = vec3<f32>(select(0.0, a[r9 + pix2], live2));
                    let d9_3 = vec3<f32>(select(0.0, a[r9 + pix3], live3));
                    c0_9a = fma(d9_3, v3_0a, fma(d9_2, v2_0a, fma(d9_1, v1_0a, fma(d9_0, v0_0a, c0_9a))));
                    c0_9b = fma(d9_3, v3_0b, fma(d9_2, v2_0b, fma(d9_1, v1_0b, fma(d9_0, v0_0b, c0_9b))));
                    c0_9c = fma(d9_3, v3_0c, fma(d9_2, v2_0c, fma(d9_1, v1_0c, fma(d9_0, v0_0c, c0_9c))));
                    c1_9a = fma(d9_3, v3_1a, fma(d9_2, v2_1a, fma(d9_1, v1_1a, fma(d9_0, v0_1a, c1_9a))));
                    c1_9b = fma(d9_3, v3_1b, fma(d9_2, v2_1b, fma(d9_1, v1_1b, fma(d9_0, v0_1b, c1_9b))));
                    c1_9c = fma(d9_3, v3_1c, fma(d9_2, v2_1c, fma(d9_1, v1_1c, fma(d9_0, v0_1c, c1_9c))));
                    let r10 = min(t.m0 + 10u, P.rows - 1u) * ohw;
                    let d10_0 = vec3<f32>(a[r10 + pix]);
                    let d10_1 = vec3<f32>(select(0.0, a[r10 + pix1], live1));
                    let d10_2 = vec3<f32>(select(0.0, a[r10 + pix2], live2));
                    let d10_3 = vec3<f32>(select(0.0, a[r10 + pix3], live3));
                    c0_10a = fma(d10_3, v3_0a, fma(d10_2, v2_0a, fma(d10_1, v1_0a, fma(d10_0, v0_0a, c0_10a))));
                    c0_10b = fma(d10_3, v3_0b, fma(d10_2, v2_0b, fma(d10_1, v1_0b, fma(d10_0, v0_0b, c0_10b))));
                    c0_10c = fma(d10_3, v3_0c, fma(d10_2, v2_0c, fma(d10_1, v1_0c, fma(d10_0, v0_0c, c0_10c))));
                    c1_10a = fma(d10_3, v3_1a, fma(d10_2, v2_1a, fma(d10_1, v1_1a, fma(d10_0, v0_1a, c1_10a))));
                    c1_10b = fma(d10_3, v3_1b, fma(d10_2, v2_1b, fma(d10_1, v1_1b, fma(d10_0, v0_1b, c1_10b))));
                    c1_10c = fma(d10_3, v3_1c, fma(d10_2, v2_1c, fma(d10_1, v1_1c, fma(d10_0, v0_1c, c1_10c))));
                    let r11 = min(t.m0 + 11u, P.rows - 1u) * ohw;
                    let d11_0 = vec3<f32>(a[r11 + pix]);
                    let d11_1 = vec3<f32>(select(0.0, a[r11 + pix1], live1));
                    let d11_2 = vec3<f32>(select(0.0, a[r11 + pix2], live2));
                    let d11_3 = vec3<f32>(select(0.0, a[r11 + pix3], live3));
                    c0_11a = fma(d11_3, v3_0a, fma(d11_2, v2_0a, fma(d11_1, v1_0a, fma(d11_0, v0_0a, c0_11a))));
                    c0_11b = fma(d11_3, v3_0b, fma(d11_2, v2_0b, fma(d11_1, v1_0b, fma(d11_0, v0_0b, c0_11b))));
                    c0_11c = fma(d11_3, v3_0c, fma(d11_2, v2_0c, fma(d11_1, v1_0c, fma(d11_0, v0_0c, c0_11c))));
                    c1_11a = fma(d11_3, v3_1a, fma(d11_2, v2_1a, fma(d11_1, v1_1a, fma(d11_0, v0_1a, c1_11a))));
                    c1_11b = fma(d11_3, v3_1b, fma(d11_2, v2_1b, fma(d11_1, v1_1b, fma(d11_0, v0_1b, c1_11b))));
                    c1_11c = fma(d11_3, v3_1c, fma(d11_2, v2_1c, fma(d11_1, v1_1c, fma(d11_0, v0_1c, c1_11c))));
                    let r12 = min(t.m0 + 12u, P.rows - 1u) * ohw;
                    let d12_0 = vec3<f32>(a[r12 + pix]);
                    let d12_1 = vec3<f32>(select(0.0, a[r12 + pix1], live1));
                    let d12_2 = vec3<f32>(select(0.0, a[r12 + pix2], live2));
                    let d12_3 = vec3<f32>(select(0.0, a[r12 + pix3], live3));
                    c0_12a = fma(d12_3, v3_0a, fma(d12_2, v2_0a, fma(d12_1, v1_0a, fma(d12_0, v0_0a, c0_12a))));
                    c0_12b = fma(d12_3, v3_0b, fma(d12_2, v2_0b, fma(d12_1, v1_0b, fma(d12_0, v0_0b, c0_12b))));
                    c0_12c = fma(d12_3, v3_0c, fma(d12_2, v2_0c, fma(d12_1, v1_0c, fma(d12_0, v0_0c, c0_12c))));
                    c1_12a = fma(d12_3, v3_1a, fma(d12_2, v2_1a, fma(d12_1, v1_1a, fma(d12_0, v0_1a, c1_12a))));
                    c1_12b = fma(d12_3, v3_1b, fma(d12_2, v2_1b, fma(d12_1, v1_1b, fma(d12_0, v0_1b, c1_12b))));
                    c1_12c = fma(d12_3, v3_1c, fma(d12_2, v2_1c, fma(d12_1, v1_1c, fma(d12_0, v0_1c, c1_12c))));
                    let r13 = min(t.m0 + 13u, P.rows - 1u) * ohw;
                    let d13_0 = vec3<f32>(a[r13 + pix]);
                    let d13_1 = vec3<f32>(select(0.0, a[r13 + pix1], live1));
                    let d13_2 = vec3<f32>(select(0.0, a[r13 + pix2], live2));
                    let d13_3 = vec3<f32>(select(0.0, a[r13 + pix3], live3));
                    c0_13a = fma(d13_3, v3_0a, fma(d13_2, v2_0a, fma(d13_1, v1_0a, fma(d13_0, v0_0a, c0_13a))));
                    c0_13b = fma(d13_3, v3_0b, fma(d13_2, v2_0b, fma(d13_1, v1_0b, fma(d13_0, v0_0b, c0_13b))));
                    c0_13c = fma(d13_3, v3_0c, fma(d13_2, v2_0c, fma(d13_1, v1_0c, fma(d13_0, v0_0c, c0_13c))));
                    c1_13a = fma(d13_3, v3_1a, fma(d13_2, v2_1a, fma(d13_1, v1_1a, fma(d13_0, v0_1a, c1_13a))));
                    c1_13b = fma(d13_3, v3_1b, fma(d13_2, v2_1b, fma(d13_1, v1_1b, fma(d13_0, v0_1b, c1_13b))));
                    c1_13c = fma(d13_3, v3_1c, fma(d13_2, v2_1c, fma(d13_1, v1_1c, fma(d13_0, v0_1c, c1_13c))));
                    let r14 = min(t.m0 + 14u, P.rows - 1u) * ohw;
                    let d14_0 = vec3<f32>(a[r14 + pix]);
                    let d14_1 = vec3<f32>(select(0.0, a[r14 + pix1], live1));
                    let d14_2 = vec3<f32>(select(0.0, a[r14 + pix2], live2));
                    let d14_3 = vec3<f32>(select(0.0, a[r14 + pix3], live3));
                    c0_14a = fma(d14_3, v3_0a, fma(d14_2, v2_0a, fma(d14_1, v1_0a, fma(d14_0, v0_0a, c0_14a))));
                    c0_14b = fma(d14_3, v3_0b, fma(d14_2, v2_0b, fma(d14_1, v1_0b, fma(d14_0, v0_0b, c0_14b))));
                    c0_14c = fma(d14_3, v3_0c, fma(d14_2, v2_0c, fma(d14_1, v1_0c, fma(d14_0, v0_0c, c0_14c))));
                    c1_14a = fma(d14_3, v3_1a, fma(d14_2, v2_1a, fma(d14_1, v1_1a, fma(d14_0, v0_1a, c1_14a))));
                    c1_14b = fma(d14_3, v3_1b, fma(d14_2, v2_1b, fma(d14_1, v1_1b, fma(d14_0, v0_1b, c1_14b))));
                    c1_14c = fma(d14_3, v3_1c, fma(d14_2, v2_1c, fma(d14_1, v1_1c, fma(d14_0, v0_1c, c1_14c))));
                    let r15 = min(t.m0 + 15u, P.rows - 1u) * ohw;
                    let d15_0 = vec3<f32>(a[r15 + pix]);
                    let d15_1 = vec3<f32>(select(0.0, a[r15 + pix1], live1));
                    let d15_2 = vec3<f32>(select(0.0, a[r15 + pix2], live2));
                    let d15_3 = vec3<f32>(select(0.0, a[r15 + pix3], live3));
                    c0_15a = fma(d15_3, v3_0a, fma(d15_2, v2_0a, fma(d15_1, v1_0a, fma(d15_0, v0_0a, c0_15a))));
                    c0_15b = fma(d15_3, v3_0b, fma(d15_2, v2_0b, fma(d15_1, v1_0b, fma(d15_0, v0_0b, c0_15b))));
                    c0_15c = fma(d15_3, v3_0c, fma(d15_2, v2_0c, fma(d15_1, v1_0c, fma(d15_0, v0_0c, c0_15c))));
                    c1_15a = fma(d15_3, v3_1a, fma(d15_2, v2_1a, fma(d15_1, v1_1a, fma(d15_0, v0_1a, c1_15a))));
                    c1_15b = fma(d15_3, v3_1b, fma(d15_2, v2_1b, fma(d15_1, v1_1b, fma(d15_0, v0_1b, c1_15b))));
                    c1_15c = fma(d15_3, v3_1c, fma(d15_2, v2_1c, fma(d15_1, v1_1c, fma(d15_0, v0_1c, c1_15c))));
                }
                x0_0_0 = x0_0_4;
                x0_0_1 = x0_0_5;
                x0_1_0 = x0_1_4;
                x0_1_1 = x0_1_5;
                x0_2_0 = x0_2_4;
                x0_2_1 = x0_2_5;
                x1_0_0 = x1_0_4;
                x1_0_1 = x1_0_5;
                x1_1_0 = x1_1_4;
                x1_1_1 = x1_1_5;
                x1_2_0 = x1_2_4;
                x1_2_1 = x1_2_5;
                pix = pix + 4u;
            }
        }
    }
    wgrad3_store(t, 0u, 0u, c0_0a, c0_0b, c0_0c);
    wgrad3_store(t, 0u, 1u, c0_1a, c0_1b, c0_1c);
    wgrad3_store(t, 0u, 2u, c0_2a, c0_2b, c0_2c);
    wgrad3_store(t, 0u, 3u, c0_3a, c0_3b, c0_3c);
    wgrad3_store(t, 0u, 4u, c0_4a, c0_4b, c0_4c);
    wgrad3_store(t, 0u, 5u, c0_5a, c0_5b, c0_5c);
    wgrad3_store(t, 0u, 6u, c0_6a, c0_6b, c0_6c);
    wgrad3_store(t, 0u, 7u, c0_7a, c0_7b, c0_7c);
    wgrad3_store(t, 0u, 8u, c0_8a, c0_8b, c0_8c);
    wgrad3_store(t, 0u, 9u, c0_9a, c0_9b, c0_9c);
    wgrad3_store(t, 0u, 10u, c0_10a, c0_10b, c0_10c);
    wgrad3_store(t, 0u, 11u, c0_11a, c0_11b, c0_11c);
    wgrad3_store(t, 0u, 12u, c0_12a, c0_12b, c0_12c);
    wgrad3_store(t, 0u, 13u, c0_13a, c0_13b, c0_13c);
    wgrad3_store(t, 0u, 14u, c0_14a, c0_14b, c0_14c);
    wgrad3_store(t, 0u, 15u, c0_15a, c0_15b, c0_15c);
    wgrad3_store(t, 1u, 0u, c1_0a, c1_0b, c1_0c);
    wgrad3_store(t, 1u, 1u, c1_1a, c1_1b, c1_1c);
    wgrad3_store(t, 1u, 2u, c1_2a, c1_2b, c1_2c);
    wgrad3_store(t, 1u, 3u, c1_3a, c1_3b, c1_3c);
    wgrad3_store(t, 1u, 4u, c1_4a, c1_4b, c1_4c);
    wgrad3_store(t, 1u, 5u, c1_5a, c1_5b, c1_5c);
    wgrad3_store(t, 1u, 6u, c1_6a, c1_6b, c1_6c);
    wgrad3_store(t, 1u, 7u, c1_7a, c1_7b, c1_7c);
    wgrad3_store(t, 1u, 8u, c1_8a, c1_8b, c1_8c);
    wgrad3_store(t, 1u, 9u, c1_9a, c1_9b, c1_9c);
    wgrad3_store(t, 1u, 10u, c1_10a, c1_10b, c1_10c);
    wgrad3_store(t, 1u, 11u, c1_11a, c1_11b, c1_11c);
    wgrad3_store(t, 1u, 12u, c1_12a, c1_12b, c1_12c);
    wgrad3_store(t, 1u, 13u, c1_13a, c1_13b, c1_13c);
    wgrad3_store(t, 1u, 14u, c1_14a, c1_14b, c1_14c);
    wgrad3_store(t, 1u, 15u, c1_15a, c1_15b, c1_15c);
}
// END generated by tools/gen_wgrad3.py
