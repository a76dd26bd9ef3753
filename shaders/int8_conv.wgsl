// int8_conv.wgsl: integer conv2d (groups, depthwise, stride, padding, dilation) and linear
// requires: lib/requant.wgsl
// requires: lib/dot4_portable.wgsl
// on packed int8 codes with i32 accumulation and a requantization epilogue, bit-exact with
// reference::int8::{conv2d_int8, linear_int8}. `dot4(a, b)` (the i32 dot product of the four
// signed 8-bit lanes of two words) comes from lib/dot4_portable.wgsl (extractBits + i32
// multiply-adds) or lib/dot4_packed.wgsl (dot4I8Packed); src/kernels/int8.rs builds one module
// with each and picks one per launch (GpuContext::int8_dot).
//
// Layouts (see int8.wgsl): input words x [N, CQ, H, W] (CQ = ceil(C / 4), 4 channels per
// word, lane j = channel 4q + j); output words [N, OQ, OH, OW] (OQ = ceil(O / 4), padding
// lanes 0). Weight words wt [O, NQ, KH, KW]: word (o, t, ky, kx) holds the weights of input
// channels 4 * (first_q[o] + t) + j for that lane j, 0 for channels outside o's group, where
// first_q[o] = floor(g * CG / 4) for o's group g, so groups need not start on a word boundary
// (depthwise: one non-zero lane per word). The accumulator is
//     acc[o] = bias'[o] + sum over taps and t of dot4(x word, w word),
//     bias'[o] = bias[o] - x_zp * sum(w[o])      (folded on the host, wrapping i32),
// and an out-of-bounds (padding) tap adds x_zp * dot4(0x01010101, w word) = x_zp * (sum of its
// lanes) instead of a dot with the input, so every tap contributes sum_j (x_j - x_zp) * w_j,
// exactly as the reference (padding adds 0); all sums wrap mod 2^32 like the reference's.
// Padding lanes of x may hold anything: their weights are 0.
// Linear is the 1x1 case: x words [N, IQ], weight words [O, IQ] (first_q = 0, NQ = IQ).
//
// Bindings (group 0):
//   @group(0) @binding(0) params: uniform Params  sizes and settings (fields below), x_zp,
//                                 out_zp, lo and hi (requantization clamp), mode (0: fixed
//                                 point, 1: float, as RequantMode)
//   @group(0) @binding(1) x:      storage, read array<u32>  packed input codes
//   @group(0) @binding(2) wt:     storage, read array<u32>  packed weight codes
//   @group(0) @binding(3) rq:     storage, read array<vec4<i32>>  two per output channel o:
//                                 rq[2o] = (bias', multiplier, shift, first_q),
//                                 rq[2o + 1] = (f32 bits of scale, 0, 0, 0)
//   @group(0) @binding(4) out:    storage, read_write array<u32>  packed output codes
//
// Entry points and dispatch shapes (workgroup (WG, 1, 1), WG an override constant, default 64;
// 1-D grids over `count` items tiled over x and y past 65,535 workgroups, flat index
// gid.x + gid.y * num_workgroups.x * WG, bounds-checked):
//   conv2d (0-4): one item per (n, output word-channel oq, oy, block of PX = 4 output columns);
//     count = N * OQ * OH * ceil(OW / 4); each item computes 4 channels x 4 pixels.
//   linear (0-4): one item per (block of RB = 4 rows, oq); count = ceil(N / 4) * OQ; each item
//     computes 4 rows x 4 output channels.

override WG: u32 = 64u;

const PX: u32 = 4u;

struct Params {
    n: u32,
    c: u32,
    cq: u32,
    h: u32,
    w: u32,
    o: u32,
    oq: u32,
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
    nq: u32,
    owb: u32,
    count: u32,
    x_zp: i32,
    out_zp: i32,
    lo: i32,
    hi: i32,
    mode: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> wt: array<u32>;
@group(0) @binding(3) var<storage, read> rq: array<vec4<i32>>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;

fn flat_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * (nwg.x * WG);
}

// The code of accumulator acc in output channel oc (r = rq[2 * oc]), in lane j.
fn lane_code(acc: i32, r: vec4<i32>, oc: u32, j: u32) -> u32 {
    var code: i32;
    if (params.mode == 1u) {
        let scale = bitcast<f32>(rq[2u * oc + 1u].x);
        code = float_requant_code(acc, scale, params.out_zp, params.lo, params.hi);
    } else {
        code = requant_code(acc, r.y, r.z, params.out_zp, params.lo, params.hi);
    }
    return (bitcast<u32>(code) & 0xffu) << (8u * j);
}

@compute @workgroup_size(WG)
fn conv2d(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let oxb = t % params.owb;
    let oy = (t / params.owb) % params.oh;
    let oq = (t / (params.owb * params.oh)) % params.oq;
    let n = t / (params.owb * params.oh * params.oq);
    let ox0 = oxb * PX;

    // Output channels of this word (lanes past O are padding: no weights, written as 0).
    var r: array<vec4<i32>, 4>;
    var acc: array<vec4<i32>, 4>;
    let live = min(params.o - 4u * oq, 4u);
    for (var j = 0u; j < live; j++) {
        r[j] = rq[2u * (4u * oq + j)];
        acc[j] = vec4<i32>(r[j].x);
    }
    let wstride = params.nq * params.kh * params.kw;
    let xplane = params.h * params.w;
    let xbatch = n * params.cq;
    // Input x coordinate of pixel p at tap kx: (ox0 + p) * sw + kx * dw - pw (as i32).
    let ix0 = i32(ox0 * params.sw) - i32(params.pw);
    let iw = i32(params.w);
    let ih = i32(params.h);
    let zp = params.x_zp;

    for (var tq = 0u; tq < params.nq; tq++) {
        for (var ky = 0u; ky < params.kh; ky++) {
            let iy = i32(oy * params.sh + ky * params.dh) - i32(params.ph);
            let row_ok = iy >= 0 && iy < ih;
            for (var kx = 0u; kx < params.kw; kx++) {
                let ixk = ix0 + i32(kx * params.dw);
                let widx = (tq * params.kh + ky) * params.kw + kx;
                var ok: vec4<bool>;
                var ixc: vec4<u32>;
                for (var p = 0u; p < PX; p++) {
                    let ix = ixk + i32(p * params.sw);
                    ok[p] = row_ok && ix >= 0 && ix < iw;
                    ixc[p] = u32(clamp(ix, 0, max(iw - 1, 0)));
                }
                var cur = 0xffffffffu;
                var xv = vec4<u32>(0u);
                for (var j = 0u; j < live; j++) {
                    let q = min(u32(r[j].w) + tq, params.cq - 1u);
                    if (q != cur) {
                        cur = q;
                        let rowbase = (xbatch + q) * xplane + u32(max(iy, 0)) * params.w;
                        for (var p = 0u; p < PX; p++) {
                            if (ok[p]) {
                                xv[p] = x[rowbase + ixc[p]];
                            }
                        }
                    }
                    let wv = wt[(4u * oq + j) * wstride + widx];
                    let pad = zp * dot4(0x01010101u, wv);
                    acc[j] += select(vec4<i32>(pad),
                                     vec4<i32>(dot4(xv.x, wv), dot4(xv.y, wv), dot4(xv.z, wv),
                                               dot4(xv.w, wv)),
                                     ok);
                }
            }
        }
    }

    let obase = ((n * params.oq + oq) * params.oh + oy) * params.ow;
    for (var p = 0u; p < PX; p++) {
        let ox = ox0 + p;
        if (ox >= params.ow) {
            break;
        }
        var word = 0u;
        for (var j = 0u; j < live; j++) {
            word |= lane_code(acc[j][p], r[j], 4u * oq + j, j);
        }
        out[obase + ox] = word;
    }
}

@compute @workgroup_size(WG)
fn linear(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let oq = t % params.oq;
    let row0 = (t / params.oq) * 4u;
    let live = min(params.o - 4u * oq, 4u);
    let rows = min(params.n - row0, 4u);
    var r: array<vec4<i32>, 4>;
    var acc: array<vec4<i32>, 4>;
    for (var j = 0u; j < live; j++) {
        r[j] = rq[2u * (4u * oq + j)];
        acc[j] = vec4<i32>(r[j].x);
    }
    // Rows past N re-read the last row (their sums are never written).
    let xr = vec4<u32>(row0, row0 + min(1u, rows - 1u), row0 + min(2u, rows - 1u),
                       row0 + min(3u, rows - 1u)) * params.cq;
    for (var k = 0u; k < params.cq; k++) {
        let xv = vec4<u32>(x[xr.x + k], x[xr.y + k], x[xr.z + k], x[xr.w + k]);
        for (var j = 0u; j < live; j++) {
            let wv = wt[(4u * oq + j) * params.cq + k];
            acc[j] += vec4<i32>(dot4(xv.x, wv), dot4(xv.y, wv), dot4(xv.z, wv),
                                dot4(xv.w, wv));
        }
    }
    for (var p = 0u; p < rows; p++) {
        var word = 0u;
        for (var j = 0u; j < live; j++) {
            word |= lane_code(acc[j][p], r[j], 4u * oq + j, j);
        }
        out[(row0 + p) * params.oq + oq] = word;
    }
}
