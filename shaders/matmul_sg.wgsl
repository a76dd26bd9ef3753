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
