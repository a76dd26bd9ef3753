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
// Dense fast path (shared_q = 1, set by the host when the 4 channels of every output word read
// the same input words: groups = 1, or groups whose channel counts keep words aligned): each
// tap's 4 input words are read and unpacked once (lib unpack4) for all 4 output channels, and
// a padding tap reads the word zp_word = x_zp's low byte in all 4 lanes instead, which adds
// x_zp8 * (sum of the w word's lanes), x_zp8 = x_zp's low byte sign-extended; when x_zp is
// outside [-128, 127], zp_rest = x_zp - x_zp8 times that lane sum is added on padding taps
// too, so a padding tap still adds x_zp * (sum of its lanes) mod 2^32. The conv weight words
// and rq rows are padded on the host to 4 * OQ channels (zeros), so the channel loop is
// always 4 long. Otherwise (shared_q = 0: depthwise and other grouped convs) each channel
// reads its own words, as described above.
// Linear is the 1x1 case: x words [N, IQ], weight words [O, IQ] (first_q = 0, NQ = IQ).
//
// Bindings (group 0):
//   @group(0) @binding(0) params: uniform Params  sizes and settings (fields below), x_zp,
//                                 out_zp, lo and hi (requantization clamp), mode (0: fixed
//                                 point, 1: float, as RequantMode); conv2d: zp_word, zp_rest,
//                                 shared_q (the dense fast path, above)
//   @group(0) @binding(1) x:      storage, read array<u32>  packed input codes
//   @group(0) @binding(2) wt:     storage, read array<u32>  packed weight codes (conv2d:
//                                 [4 * OQ, NQ, KH, KW], channels past O all 0)
//   @group(0) @binding(3) rq:     storage, read array<vec4<i32>>  two per output channel o:
//                                 rq[2o] = (bias', multiplier, shift, first_q),
//                                 rq[2o + 1] = (f32 bits of scale, 0, 0, 0); conv2d: 4 * OQ
//                                 channels (padding channels: bias 0, first_q of the word's
//                                 first channel)
//   @group(0) @binding(4) out:    storage, read_write array<u32>  packed output codes
//
// Entry points and dispatch shapes (workgroup (WG, 1, 1), WG an override constant, default 64;
// 1-D grids over `count` items tiled over x and y past 65,535 workgroups, flat index
// gid.x + gid.y * num_workgroups.x * WG, bounds-checked):
//   conv2d (0-4): one item per (n, output word-channel oq, oy, block of PX = 4 output columns);
//     count = N * OQ * OH * ceil(OW / 4); each item computes 4 channels x 4 pixels.
//   linear (0-4): one item per (block of RB = 4 rows, oq); count = ceil(N / 4) * OQ; each item
//     computes 4 rows x 4 output channels.
//   conv2d_dw (0-4): depthwise 3x3 convs at stride 1, dilation 1 (one channel per group,
//     C = O, so output word oq reads input word oq lane by lane), any padding: one item per
//     (n, oq, block of DW_ROWS = 4 output rows); count = N * OQ * ceil(OH / 4). Each item walks
//     its 4 rows left to right one output word (4 channels of one pixel) at a time, keeping
//     per input row (6 of them) the last three input words unpacked, so each step loads one
//     word per input row (6 loads and 4 stores for 16 outputs) and does 9 vec4<i32>
//     multiply-adds per output word; a padding tap takes x_zp in every lane (the bias' fold
//     above). The 9 taps' weights (lane j of channel 4oq + j's words) and the 4 channels'
//     requantization rows are read once per item. No dot products: the same code in both
//     modules.

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
    zp_word: u32,
    zp_rest: i32,
    shared_q: u32,
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

// Whether input column ix of a row (row_ok: the row is inside the input) is inside the input.
fn col_ok(row_ok: bool, ix: i32) -> bool {
    return row_ok && ix >= 0 && ix < i32(params.w);
}

// The input word at column ix of the row starting at rowbase, or zp_word for a padding tap.
fn x_word(rowbase: u32, ix: i32, ok: bool) -> u32 {
    var word = params.zp_word;
    if (ok) {
        word = x[rowbase + u32(ix)];
    }
    return word;
}

// One tap of the dense fast path: the 4 channels' weight words at wt[w0 + j * wstride] against
// the 4 pixels' input words xs (padding taps: zp_word, plus zp_rest times the lane sum).
fn tap(acc: ptr<function, array<vec4<i32>, 4>>, xs: array<I8x4, 4>, ok: vec4<bool>, w0: u32,
       wstride: u32) {
    for (var j = 0u; j < 4u; j++) {
        let wv = wt[w0 + j * wstride];
        let wu = unpack4(wv);
        (*acc)[j] += vec4<i32>(dot4u(xs[0], wu), dot4u(xs[1], wu), dot4u(xs[2], wu),
                               dot4u(xs[3], wu));
        if (params.zp_rest != 0) {
            let pad = params.zp_rest * dot4(0x01010101u, wv);
            (*acc)[j] += select(vec4<i32>(pad), vec4<i32>(0), ok);
        }
    }
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

    // Output channels of this word (lanes past O are padding: zero weights and rows on the
    // host, written as 0).
    var r: array<vec4<i32>, 4>;
    var acc: array<vec4<i32>, 4>;
    let live = min(params.o - 4u * oq, 4u);
    for (var j = 0u; j < 4u; j++) {
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

    if (params.shared_q != 0u) {
        // Dense fast path: the 4 channels read the same input words.
        let q0 = u32(r[0].w);
        let wbase = 4u * oq * wstride;
        // Stride 1 and dilation 1: pixel p at tap kx reads column ix0 + kx + p, so moving to
        // the next kx shifts the 4 words by one and reads one new word.
        let slide = params.sw == 1u && params.dw == 1u;
        for (var tq = 0u; tq < params.nq; tq++) {
            let plane = (xbatch + min(q0 + tq, params.cq - 1u)) * xplane;
            for (var ky = 0u; ky < params.kh; ky++) {
                let iy = i32(oy * params.sh + ky * params.dh) - i32(params.ph);
                let row_ok = iy >= 0 && iy < ih;
                let rowbase = plane + u32(clamp(iy, 0, max(ih - 1, 0))) * params.w;
                let wrow = wbase + (tq * params.kh + ky) * params.kw;
                if (slide) {
                    var ok = vec4<bool>(false, col_ok(row_ok, ix0), col_ok(row_ok, ix0 + 1),
                                        col_ok(row_ok, ix0 + 2));
                    var xs: array<I8x4, 4>;
                    xs[1] = unpack4(x_word(rowbase, ix0, ok.y));
                    xs[2] = unpack4(x_word(rowbase, ix0 + 1, ok.z));
                    xs[3] = unpack4(x_word(rowbase, ix0 + 2, ok.w));
                    for (var kx = 0u; kx < params.kw; kx++) {
                        let ix = ix0 + i32(kx) + 3;
                        let ok3 = col_ok(row_ok, ix);
                        ok = vec4<bool>(ok.y, ok.z, ok.w, ok3);
                        xs[0] = xs[1];
                        xs[1] = xs[2];
                        xs[2] = xs[3];
                        xs[3] = unpack4(x_word(rowbase, ix, ok3));
                        tap(&acc, xs, ok, wrow + kx, wstride);
                    }
                } else {
                    for (var kx = 0u; kx < params.kw; kx++) {
                        let ixk = ix0 + i32(kx * params.dw);
                        var ok: vec4<bool>;
                        var xs: array<I8x4, 4>;
                        for (var p = 0u; p < PX; p++) {
                            let ix = ixk + i32(p * params.sw);
                            ok[p] = col_ok(row_ok, ix);
                            xs[p] = unpack4(x_word(rowbase, ix, ok[p]));
                        }
                        tap(&acc, xs, ok, wrow + kx, wstride);
                    }
                }
            }
        }
        write_conv(acc, r, n, oq, oy, ox0, live);
        return;
    }

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

    write_conv(acc, r, n, oq, oy, ox0, live);
}

// Requantizes and writes the 4 channels x PX columns of one conv2d item (lanes j >= live 0).
fn write_conv(acc: array<vec4<i32>, 4>, r: array<vec4<i32>, 4>, n: u32, oq: u32, oy: u32,
              ox0: u32, live: u32) {
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

// conv2d_dw: see the header.
const DW_ROWS: u32 = 4u;

// The four signed 8-bit lanes of a word as i32 (extractBits: core WGSL in both modules).
fn dw_unpack(word: u32) -> vec4<i32> {
    let v = bitcast<i32>(word);
    return vec4<i32>(extractBits(v, 0u, 8u), extractBits(v, 8u, 8u), extractBits(v, 16u, 8u),
                     extractBits(v, 24u, 8u));
}

// The 4 channels of input word (plane, iy, ix), or x_zp in every lane outside the input
// (branch-free: the index is clamped into the plane).
fn dw_x(plane: u32, iy: i32, ix: i32) -> vec4<i32> {
    let ok = iy >= 0 && iy < i32(params.h) && ix >= 0 && ix < i32(params.w);
    let row = u32(clamp(iy, 0, i32(params.h) - 1));
    let col = u32(clamp(ix, 0, i32(params.w) - 1));
    return select(vec4<i32>(params.x_zp), dw_unpack(x[(plane * params.h + row) * params.w + col]),
                  ok);
}

// Tap `tap` (ky * 3 + kx) of the 4 channels of output word oq: lane j of channel 4oq + j's
// weight word (NQ = 1, 9 taps per channel).
fn dw_w(oq: u32, tap: u32) -> vec4<i32> {
    let b = 36u * oq + tap;
    return vec4<i32>(extractBits(bitcast<i32>(wt[b]), 0u, 8u),
                     extractBits(bitcast<i32>(wt[b + 9u]), 8u, 8u),
                     extractBits(bitcast<i32>(wt[b + 18u]), 16u, 8u),
                     extractBits(bitcast<i32>(wt[b + 27u]), 24u, 8u));
}

// One output word: the 3x3 taps over input rows (a: column ox - pw, b: + 1, c: + 2) of rows
// 0, 1, 2 of the window.
fn dw_acc(bias: vec4<i32>, a0: vec4<i32>, b0: vec4<i32>, c0: vec4<i32>, a1: vec4<i32>,
          b1: vec4<i32>, c1: vec4<i32>, a2: vec4<i32>, b2: vec4<i32>, c2: vec4<i32>,
          w: array<vec4<i32>, 9>) -> vec4<i32> {
    return bias + a0 * w[0] + b0 * w[1] + c0 * w[2] + a1 * w[3] + b1 * w[4] + c1 * w[5]
        + a2 * w[6] + b2 * w[7] + c2 * w[8];
}

// The output word of accumulators acc (rows r, float scales sc; lanes where keep is 0 are 0):
// requant_code / float_requant_code of each lane, the float mode on all four lanes at once
// where every accumulator is below 2^24 in magnitude (so f32(acc) is exact, as
// i32_to_f32_rn), the same arithmetic and saturation as float_requant_code.
fn dw_word(acc: vec4<i32>, r: array<vec4<i32>, 4>, sc: vec4<f32>, keep: vec4<u32>) -> u32 {
    var code: vec4<i32>;
    let lo = params.lo;
    let hi = params.hi;
    let zp = params.out_zp;
    if (params.mode == 1u) {
        let lim = vec4<i32>(0x1000000);
        if (all(acc < lim) && all(acc > -lim)) {
            let p = vec4<f32>(acc) * sc;
            let v = clamp(round(p) + f32(zp), vec4<f32>(f32(lo)), vec4<f32>(f32(hi)));
            let sat = select(vec4<i32>(hi), vec4<i32>(lo), p < vec4<f32>(0.0));
            code = select(vec4<i32>(v), sat, abs(p) >= vec4<f32>(16777216.0));
        } else {
            code = vec4<i32>(float_requant_code(acc.x, sc.x, zp, lo, hi),
                             float_requant_code(acc.y, sc.y, zp, lo, hi),
                             float_requant_code(acc.z, sc.z, zp, lo, hi),
                             float_requant_code(acc.w, sc.w, zp, lo, hi));
        }
    } else {
        code = vec4<i32>(requant_code(acc.x, r[0].y, r[0].z, zp, lo, hi),
                         requant_code(acc.y, r[1].y, r[1].z, zp, lo, hi),
                         requant_code(acc.z, r[2].y, r[2].z, zp, lo, hi),
                         requant_code(acc.w, r[3].y, r[3].z, zp, lo, hi));
    }
    let b = (bitcast<vec4<u32>>(code) & vec4<u32>(0xffu)) * keep
        << vec4<u32>(0u, 8u, 16u, 24u);
    return b.x | b.y | b.z | b.w;
}

@compute @workgroup_size(WG)
fn conv2d_dw(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let blocks = (params.oh + DW_ROWS - 1u) / DW_ROWS;
    let plane = t / blocks;          // n * OQ + oq (= n * CQ + oq)
    let oy0 = (t % blocks) * DW_ROWS;
    let oq = plane % params.oq;
    var w: array<vec4<i32>, 9>;
    for (var k = 0u; k < 9u; k++) {
        w[k] = dw_w(oq, k);
    }
    var r: array<vec4<i32>, 4>;
    var sc = vec4<f32>(0.0);
    for (var j = 0u; j < 4u; j++) {
        r[j] = rq[2u * (4u * oq + j)];
        sc[j] = bitcast<f32>(rq[2u * (4u * oq + j) + 1u].x);
    }
    let bias = vec4<i32>(r[0].x, r[1].x, r[2].x, r[3].x);
    let live = min(params.o - 4u * oq, 4u);
    let keep = select(vec4<u32>(0u), vec4<u32>(1u), vec4<u32>(0u, 1u, 2u, 3u) < vec4<u32>(live));
    let rows = min(params.oh - oy0, DW_ROWS);
    let iy0 = i32(oy0) - i32(params.ph);
    let ix0 = -i32(params.pw);
    let ow = params.ow;
    let obase = (plane * params.oh + oy0) * ow;
    // Per input row k: columns ox - pw (a) and ox - pw + 1 (b); each step reads ox - pw + 2.
    var a0 = dw_x(plane, iy0, ix0);
    var a1 = dw_x(plane, iy0 + 1, ix0);
    var a2 = dw_x(plane, iy0 + 2, ix0);
    var a3 = dw_x(plane, iy0 + 3, ix0);
    var a4 = dw_x(plane, iy0 + 4, ix0);
    var a5 = dw_x(plane, iy0 + 5, ix0);
    var b0 = dw_x(plane, iy0, ix0 + 1);
    var b1 = dw_x(plane, iy0 + 1, ix0 + 1);
    var b2 = dw_x(plane, iy0 + 2, ix0 + 1);
    var b3 = dw_x(plane, iy0 + 3, ix0 + 1);
    var b4 = dw_x(plane, iy0 + 4, ix0 + 1);
    var b5 = dw_x(plane, iy0 + 5, ix0 + 1);
    for (var ox = 0u; ox < ow; ox++) {
        let ix = ix0 + i32(ox) + 2;
        let c0 = dw_x(plane, iy0, ix);
        let c1 = dw_x(plane, iy0 + 1, ix);
        let c2 = dw_x(plane, iy0 + 2, ix);
        let c3 = dw_x(plane, iy0 + 3, ix);
        let c4 = dw_x(plane, iy0 + 4, ix);
        let c5 = dw_x(plane, iy0 + 5, ix);
        out[obase + ox] = dw_word(dw_acc(bias, a0, b0, c0, a1, b1, c1, a2, b2, c2, w), r, sc,
                                  keep);
        if (rows > 1u) {
            out[obase + ow + ox] =
                dw_word(dw_acc(bias, a1, b1, c1, a2, b2, c2, a3, b3, c3, w), r, sc, keep);
        }
        if (rows > 2u) {
            out[obase + 2u * ow + ox] =
                dw_word(dw_acc(bias, a2, b2, c2, a3, b3, c3, a4, b4, c4, w), r, sc, keep);
        }
        if (rows > 3u) {
            out[obase + 3u * ow + ox] =
                dw_word(dw_acc(bias, a3, b3, c3, a4, b4, c4, a5, b5, c5, w), r, sc, keep);
        }
        a0 = b0;
        a1 = b1;
        a2 = b2;
        a3 = b3;
        a4 = b4;
        a5 = b5;
        b0 = c0;
        b1 = c1;
        b2 = c2;
        b3 = c3;
        b4 = c4;
        b5 = c5;
    }
}
