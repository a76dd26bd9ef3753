// int8_conv_f.wgsl: the dense integer conv2d of int8_conv.wgsl (`conv2d`) computed in exact f32
// requires: lib/requant.wgsl
// requires: lib/share_portable.wgsl
// arithmetic, with the register blocking and weight sharing of the f32 subgroup conv
// (conv2d_subgroup.wgsl: F_O output channels x 8 pixels x F_ROWS output rows per invocation,
// each weight loaded by one subgroup lane and broadcast). Bit-exact with
// reference::int8::conv2d_int8, like int8_conv.wgsl.
//
// Why f32: where f32 fma is the device's fastest arithmetic (CPU adapters, many GPUs without
// packed int8 dot products), an integer product of two codes is exact in f32, and so is any
// sum of them below 2^24 in magnitude. The kernel multiplies the codes themselves: x codes in
// [-128, 127], padding taps read x_zp (which the host allows here only in [-128, 127]), weight
// codes in [-128, 127], so each product is at most 2^14 in magnitude and any partial sum of at
// most 1024 of them at most 2^24: exact in f32, whatever the order of summation. Every
// f32 accumulator is flushed into an i32 accumulator (exact conversion, wrapping i32 add, as
// the reference's sums) after at most 1024 products: after every FQ = floor(256 / (KH * KW))
// channel words (4 channels each) and at the end. The i32 accumulators start at
// bias' = bias - x_zp * sum(w) (folded on the host, see int8_conv.wgsl), so a padding tap's
// x_zp * w and every x * w add up to bias + sum (x - x_zp) * w mod 2^32, as in int8_conv.wgsl;
// then the same requantization (lib/requant.wgsl, fixed-point or float mode per Params.mode).
//
// Layouts: int8_conv.wgsl's. Input words x [N, CQ, H, W], 4 channels per word; weight words
// wt [4 * OQ, NQ = CQ, KH, KW] (groups = 1: word t of channel o holds channels 4t .. 4t + 3);
// rq two rows per channel, rq[2o] = (bias', multiplier, shift, 0), rq[2o + 1].x = f32 bits of
// the float-mode scale; output words [N, OQ, OH, OW]. Only for groups = 1 (the host runs
// int8_conv.wgsl otherwise), x_zp in [-128, 127] (zp_rest = 0) and KH * KW <= 256.
//
// Composition: this file with lib/share_subgroup.wgsl (weights shared through subgroup
// broadcasts; needs wgpu::Features::SUBGROUP) or lib/share_portable.wgsl (every invocation
// loads its own weights), the same code otherwise (src/kernels/int8.rs builds both modules).
//
// Bindings (group 0), those of int8_conv.wgsl with the same Params:
//   @group(0) @binding(0) P:   uniform Params  (int8_conv.wgsl's; count = workgroups)
//   @group(0) @binding(1) x:   storage, read array<u32>  packed input codes
//   @group(0) @binding(2) wt:  storage, read array<u32>  packed weight codes
//   @group(0) @binding(3) rq:  storage, read array<vec4<i32>>  requantization rows
//   @group(0) @binding(4) out: storage, read_write array<u32>  packed output codes
//
// Entry point and dispatch shape:
//   conv2d_f: workgroup (F_WG, 1, 1); count = mtiles * ptiles workgroups, flat id
//     wid.x + wid.y * nwg.x (tiled over x and y past 65,535), channel block fastest:
//     mtiles = ceil(O / F_O), ptiles = ceil(N * ceil(OH / R) * ceil(OW / 8) / F_WG), R = F_ROWS
//     when F_K3 = 1, else 1. Invocation li of pixel tile pt computes block q = pt * F_WG + li
//     (row-major over n, oy / R, 8-column block): output channels m0 .. m0 + F_O - 1 (whole
//     output words; channels past O are the host's zero padding, not stored) x 8 columns x
//     R rows. Invocations past the last block compute on the last one and store nothing;
//     subgroups with none live leave together (share_all), so subgroup operations run with
//     whole subgroups.
//     F_K3 = 1 (3x3 kernels at stride 1, dilation 1 only): per channel word, the R + 2 input
//     rows are each loaded once (10 words each), the weight words of the 3 kernel rows are
//     loaded (or broadcast) once as words, and every (output row, kernel row) pair that reads
//     them is updated, channel by channel of the word (the words unpacked lane by lane).
//     F_K3 = 0 (any kernel, stride, dilation; R = 1): per tap, 8 input words and the weight
//     words of the tap.
//     In both, the four lanes of a word are four calls with constant lane numbers, not a loop:
//     with a loop (a variable lane offset) lavapipe re-unpacked, re-broadcast (or, without
//     subgroups, re-loaded) the weights for every lane, and the 3x3 row loop ran at 0.66-0.73
//     of the f32 conv's speed; unrolled, and with words broadcast rather than unpacked lanes,
//     1.1-1.4x faster than it (8x64x56x56 .. 8x512x7x7, scratch timings).
//   Override constants (chosen by the launcher): F_O (8 or 16), F_ROWS (1, 2, 4; > 1 only with
//   F_K3 = 1), F_K3 (0 or 1), F_WG (invocations per workgroup, 64).

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

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
@group(0) @binding(2) var<storage, read> wt: array<u32>;
@group(0) @binding(3) var<storage, read> rq: array<vec4<i32>>;
@group(0) @binding(4) var<storage, read_write> out: array<u32>;

// Output channels per invocation: 8 or 16.
override F_O: u32 = 16u;
// Output rows per invocation (F_K3 = 1 only): 1, 2 or 4.
override F_ROWS: u32 = 4u;
// 1: the 3x3 stride-1 row loop; 0: the generic per-tap loop.
override F_K3: u32 = 1u;
// Invocations per workgroup.
override F_WG: u32 = 64u;

// Ten consecutive input words of a row (8 output columns and the 2 more a 3-tap row reads).
struct Row {
    lo: vec4<u32>,
    hi: vec4<u32>,
    tail: vec2<u32>,
}

// Lane j (channel 4t + j) of four words, as f32.
fn lanes4(v: vec4<u32>, j: u32) -> vec4<f32> {
    return vec4<f32>(extractBits(bitcast<vec4<i32>>(v), 8u * j, 8u));
}

// The four lanes of one word, as f32.
fn unpack4f(v: u32) -> vec4<f32> {
    return vec4<f32>((vec4<i32>(bitcast<i32>(v)) << vec4<u32>(24u, 16u, 8u, 0u))
        >> vec4<u32>(24u));
}

// The input word at column ix of the row starting at rowbase, or zp_word (x_zp in every lane)
// outside the input (branch-free: no out-of-bounds read).
fn xw(rowbase: u32, ix: i32, row_ok: bool) -> u32 {
    let ok = row_ok && ix >= 0 && ix < i32(P.w);
    return select(P.zp_word, x[select(0u, rowbase + u32(ix), ok)], ok);
}

fn row_words(rowbase: u32, ix0: i32, row_ok: bool) -> Row {
    return Row(vec4<u32>(xw(rowbase, ix0, row_ok), xw(rowbase, ix0 + 1, row_ok),
                         xw(rowbase, ix0 + 2, row_ok), xw(rowbase, ix0 + 3, row_ok)),
               vec4<u32>(xw(rowbase, ix0 + 4, row_ok), xw(rowbase, ix0 + 5, row_ok),
                         xw(rowbase, ix0 + 6, row_ok), xw(rowbase, ix0 + 7, row_ok)),
               vec2<u32>(xw(rowbase, ix0 + 8, row_ok), xw(rowbase, ix0 + 9, row_ok)));
}

// Lane j of a row as the six shifted vec4s of the 3-tap update (l0, h0, l1, h1, l2, h2):
// lk / hk = columns k .. k + 3 / k + 4 .. k + 7 of the ten.
fn row_f(r: Row, j: u32) -> array<vec4<f32>, 6> {
    let l = lanes4(r.lo, j);
    let h = lanes4(r.hi, j);
    let t = vec2<f32>(extractBits(bitcast<vec2<i32>>(r.tail), 8u * j, 8u));
    return array<vec4<f32>, 6>(l, h, vec4<f32>(l.yzw, h.x), vec4<f32>(h.yzw, t.x),
                               vec4<f32>(l.zw, h.xy), vec4<f32>(h.zw, t));
}

// Start of the weight words of output channel m (clamped to the padded channels 4 * OQ: a
// block past them computes on a stand-in and stores nothing).
fn w_base(m: u32) -> u32 {
    return min(m, 4u * P.oq - 1u) * P.nq * P.kh * P.kw;
}

fn wq3(base: u32) -> vec3<u32> {
    return vec3<u32>(wt[base], wt[base + 1u], wt[base + 2u]);
}

fn lanes3(v: vec3<u32>, j: u32) -> vec3<f32> {
    return vec3<f32>(extractBits(bitcast<vec3<i32>>(v), 8u * j, 8u));
}

// The 3-tap weight words (channel word tq, kernel row `off`: its offset in a channel's weight
// words, channel word included) of output channels m0 .. m0 + F_O - 1: shared from lanes
// 0..7's words a (channel m0 + lane) and b (m0 + 8 + lane) when `share`, else loaded by this
// invocation. Once per channel word and kernel row; w_lanes unpacks each of its 4 channels.
fn w_words(share: bool, a: vec3<u32>, b: vec3<u32>, m0: u32, off: u32) -> array<vec3<u32>, 16> {
    if (share) {
        return share_words3(a, b, F_O > 8u);
    }
    // Constant indices only, here and for every accumulator array: a dynamically indexed
    // private array stays in memory on CPU adapters.
    var w = array<vec3<u32>, 16>();
    w[0] = wq3(w_base(m0 + 0u) + off);
    w[1] = wq3(w_base(m0 + 1u) + off);
    w[2] = wq3(w_base(m0 + 2u) + off);
    w[3] = wq3(w_base(m0 + 3u) + off);
    w[4] = wq3(w_base(m0 + 4u) + off);
    w[5] = wq3(w_base(m0 + 5u) + off);
    w[6] = wq3(w_base(m0 + 6u) + off);
    w[7] = wq3(w_base(m0 + 7u) + off);
    if (F_O > 8u) {
        w[8] = wq3(w_base(m0 + 8u) + off);
        w[9] = wq3(w_base(m0 + 9u) + off);
        w[10] = wq3(w_base(m0 + 10u) + off);
        w[11] = wq3(w_base(m0 + 11u) + off);
        w[12] = wq3(w_base(m0 + 12u) + off);
        w[13] = wq3(w_base(m0 + 13u) + off);
        w[14] = wq3(w_base(m0 + 14u) + off);
        w[15] = wq3(w_base(m0 + 15u) + off);
    }
    return w;
}

// Lane j (input channel 4tq + j) of w_words' words, as f32.
fn w_lanes(ww: array<vec3<u32>, 16>, j: u32) -> array<vec3<f32>, 16> {
    return array<vec3<f32>, 16>(
        lanes3(ww[0], j), lanes3(ww[1], j), lanes3(ww[2], j), lanes3(ww[3], j),
        lanes3(ww[4], j), lanes3(ww[5], j), lanes3(ww[6], j), lanes3(ww[7], j),
        lanes3(ww[8], j), lanes3(ww[9], j), lanes3(ww[10], j), lanes3(ww[11], j),
        lanes3(ww[12], j), lanes3(ww[13], j), lanes3(ww[14], j), lanes3(ww[15], j));
}

fn t3(a: vec4<f32>, w: vec3<f32>, l0: vec4<f32>, l1: vec4<f32>, l2: vec4<f32>) -> vec4<f32> {
    return fma(vec4<f32>(w.z), l2, fma(vec4<f32>(w.y), l1, fma(vec4<f32>(w.x), l0, a)));
}

// acc[2m] / acc[2m + 1] (columns 0-3 / 4-7 of channel m0 + m) += the 3-tap row update with
// weights w[m] and input row xs, for m < F_O (as conv2d_subgroup.wgsl's rows3_update).
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
    if (F_O > 8u) {
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

// The i32 accumulators of channels m0 .. m0 + F_O - 1, each starting at its bias'.
fn bias_init(m0: u32) -> array<vec4<i32>, 32> {
    let lim = 4u * P.oq - 1u;
    var a = array<vec4<i32>, 32>();
    a[0] = vec4<i32>(rq[2u * min(m0 + 0u, lim)].x);
    a[1] = a[0];
    a[2] = vec4<i32>(rq[2u * min(m0 + 1u, lim)].x);
    a[3] = a[2];
    a[4] = vec4<i32>(rq[2u * min(m0 + 2u, lim)].x);
    a[5] = a[4];
    a[6] = vec4<i32>(rq[2u * min(m0 + 3u, lim)].x);
    a[7] = a[6];
    a[8] = vec4<i32>(rq[2u * min(m0 + 4u, lim)].x);
    a[9] = a[8];
    a[10] = vec4<i32>(rq[2u * min(m0 + 5u, lim)].x);
    a[11] = a[10];
    a[12] = vec4<i32>(rq[2u * min(m0 + 6u, lim)].x);
    a[13] = a[12];
    a[14] = vec4<i32>(rq[2u * min(m0 + 7u, lim)].x);
    a[15] = a[14];
    a[16] = vec4<i32>(rq[2u * min(m0 + 8u, lim)].x);
    a[17] = a[16];
    a[18] = vec4<i32>(rq[2u * min(m0 + 9u, lim)].x);
    a[19] = a[18];
    a[20] = vec4<i32>(rq[2u * min(m0 + 10u, lim)].x);
    a[21] = a[20];
    a[22] = vec4<i32>(rq[2u * min(m0 + 11u, lim)].x);
    a[23] = a[22];
    a[24] = vec4<i32>(rq[2u * min(m0 + 12u, lim)].x);
    a[25] = a[24];
    a[26] = vec4<i32>(rq[2u * min(m0 + 13u, lim)].x);
    a[27] = a[26];
    a[28] = vec4<i32>(rq[2u * min(m0 + 14u, lim)].x);
    a[29] = a[28];
    a[30] = vec4<i32>(rq[2u * min(m0 + 15u, lim)].x);
    a[31] = a[30];
    return a;
}

// i += f (exact: every f is an integer of magnitude at most 2^24; wrapping i32 add), f = 0.
fn flush(f: ptr<function, array<vec4<f32>, 32>>, i: ptr<function, array<vec4<i32>, 32>>) {
    (*i)[0] += vec4<i32>((*f)[0]);
    (*f)[0] = vec4<f32>(0.0);
    (*i)[1] += vec4<i32>((*f)[1]);
    (*f)[1] = vec4<f32>(0.0);
    (*i)[2] += vec4<i32>((*f)[2]);
    (*f)[2] = vec4<f32>(0.0);
    (*i)[3] += vec4<i32>((*f)[3]);
    (*f)[3] = vec4<f32>(0.0);
    (*i)[4] += vec4<i32>((*f)[4]);
    (*f)[4] = vec4<f32>(0.0);
    (*i)[5] += vec4<i32>((*f)[5]);
    (*f)[5] = vec4<f32>(0.0);
    (*i)[6] += vec4<i32>((*f)[6]);
    (*f)[6] = vec4<f32>(0.0);
    (*i)[7] += vec4<i32>((*f)[7]);
    (*f)[7] = vec4<f32>(0.0);
    (*i)[8] += vec4<i32>((*f)[8]);
    (*f)[8] = vec4<f32>(0.0);
    (*i)[9] += vec4<i32>((*f)[9]);
    (*f)[9] = vec4<f32>(0.0);
    (*i)[10] += vec4<i32>((*f)[10]);
    (*f)[10] = vec4<f32>(0.0);
    (*i)[11] += vec4<i32>((*f)[11]);
    (*f)[11] = vec4<f32>(0.0);
    (*i)[12] += vec4<i32>((*f)[12]);
    (*f)[12] = vec4<f32>(0.0);
    (*i)[13] += vec4<i32>((*f)[13]);
    (*f)[13] = vec4<f32>(0.0);
    (*i)[14] += vec4<i32>((*f)[14]);
    (*f)[14] = vec4<f32>(0.0);
    (*i)[15] += vec4<i32>((*f)[15]);
    (*f)[15] = vec4<f32>(0.0);
    if (F_O > 8u) {
        (*i)[16] += vec4<i32>((*f)[16]);
        (*f)[16] = vec4<f32>(0.0);
        (*i)[17] += vec4<i32>((*f)[17]);
        (*f)[17] = vec4<f32>(0.0);
        (*i)[18] += vec4<i32>((*f)[18]);
        (*f)[18] = vec4<f32>(0.0);
        (*i)[19] += vec4<i32>((*f)[19]);
        (*f)[19] = vec4<f32>(0.0);
        (*i)[20] += vec4<i32>((*f)[20]);
        (*f)[20] = vec4<f32>(0.0);
        (*i)[21] += vec4<i32>((*f)[21]);
        (*f)[21] = vec4<f32>(0.0);
        (*i)[22] += vec4<i32>((*f)[22]);
        (*f)[22] = vec4<f32>(0.0);
        (*i)[23] += vec4<i32>((*f)[23]);
        (*f)[23] = vec4<f32>(0.0);
        (*i)[24] += vec4<i32>((*f)[24]);
        (*f)[24] = vec4<f32>(0.0);
        (*i)[25] += vec4<i32>((*f)[25]);
        (*f)[25] = vec4<f32>(0.0);
        (*i)[26] += vec4<i32>((*f)[26]);
        (*f)[26] = vec4<f32>(0.0);
        (*i)[27] += vec4<i32>((*f)[27]);
        (*f)[27] = vec4<f32>(0.0);
        (*i)[28] += vec4<i32>((*f)[28]);
        (*f)[28] = vec4<f32>(0.0);
        (*i)[29] += vec4<i32>((*f)[29]);
        (*f)[29] = vec4<f32>(0.0);
        (*i)[30] += vec4<i32>((*f)[30]);
        (*f)[30] = vec4<f32>(0.0);
        (*i)[31] += vec4<i32>((*f)[31]);
        (*f)[31] = vec4<f32>(0.0);
    }
}

// Whether the f32 accumulators are flushed after channel word tq: every FQ words (at most
// 1024 products of at most 2^14 each since the last flush) and after the last.
fn flush_after(tq: u32) -> bool {
    let fq = max(1u, 256u / max(P.kh * P.kw, 1u));
    return (tq + 1u) % fq == 0u || tq + 1u == P.cq;
}

// The code of accumulator acc in output channel oc, in lane j of its word (int8_conv.wgsl's
// lane_code).
fn code_of(acc: i32, oc: u32, j: u32) -> u32 {
    var code: i32;
    if (P.mode == 1u) {
        let scale = bitcast<f32>(rq[2u * oc + 1u].x);
        code = float_requant_code(acc, scale, P.out_zp, P.lo, P.hi);
    } else {
        let r = rq[2u * oc];
        code = requant_code(acc, r.y, r.z, P.out_zp, P.lo, P.hi);
    }
    return (bitcast<u32>(code) & 0xffu) << (8u * j);
}

// Requantizes and writes output row oy, columns ox0 .. ox0 + 7 (those below OW), of the
// output words of channels m0 .. m0 + F_O - 1 (words below OQ; lanes past O written 0).
fn store_row(a: ptr<function, array<vec4<i32>, 32>>, n: u32, oy: u32, ox0: u32, m0: u32,
             live: bool) {
    if (!live) {
        return;
    }
    let q = m0 / 4u;
    store_word(q, n, oy, ox0, array<vec4<i32>, 8>((*a)[0], (*a)[1], (*a)[2], (*a)[3], (*a)[4],
                                                  (*a)[5], (*a)[6], (*a)[7]));
    store_word(q + 1u, n, oy, ox0, array<vec4<i32>, 8>((*a)[8], (*a)[9], (*a)[10], (*a)[11],
                                                       (*a)[12], (*a)[13], (*a)[14], (*a)[15]));
    if (F_O > 8u) {
        store_word(q + 2u, n, oy, ox0, array<vec4<i32>, 8>((*a)[16], (*a)[17], (*a)[18],
            (*a)[19], (*a)[20], (*a)[21], (*a)[22], (*a)[23]));
        store_word(q + 3u, n, oy, ox0, array<vec4<i32>, 8>((*a)[24], (*a)[25], (*a)[26],
            (*a)[27], (*a)[28], (*a)[29], (*a)[30], (*a)[31]));
    }
}

// Output word oq (channels 4oq + j, accumulators acc[2j] / acc[2j + 1] for columns 0-3 / 4-7)
// at row oy, columns ox0 .. ox0 + 7 below OW; nothing for oq >= OQ.
fn store_word(oq: u32, n: u32, oy: u32, ox0: u32, acc: array<vec4<i32>, 8>) {
    if (oq >= P.oq) {
        return;
    }
    var v = acc;
    let lanes = min(P.o - 4u * oq, 4u);
    let base = ((n * P.oq + oq) * P.oh + oy) * P.ow;
    for (var p = 0u; p < 8u; p++) {
        let ox = ox0 + p;
        if (ox >= P.ow) {
            break;
        }
        var word = 0u;
        for (var j = 0u; j < lanes; j++) {
            word |= code_of(v[2u * j + p / 4u][p % 4u], 4u * oq + j, j);
        }
        out[base + ox] = word;
    }
}

// One input channel (lane j of the channel words) of conv_rows' update: every (output row,
// kernel row) pair of the F_ROWS rows.
fn lane_rows(j: u32, ww0: array<vec3<u32>, 16>, ww1: array<vec3<u32>, 16>,
             ww2: array<vec3<u32>, 16>, x0: Row, x1: Row, x2: Row, x3: Row, x4: Row, x5: Row,
             f0: ptr<function, array<vec4<f32>, 32>>,
             f1: ptr<function, array<vec4<f32>, 32>>, f2: ptr<function, array<vec4<f32>, 32>>,
             f3: ptr<function, array<vec4<f32>, 32>>) {
    let w0 = w_lanes(ww0, j);
    let w1 = w_lanes(ww1, j);
    let w2 = w_lanes(ww2, j);
    let y0 = row_f(x0, j);
    rows3_update(f0, w0, y0);
    let y1 = row_f(x1, j);
    rows3_update(f0, w1, y1);
    let y2 = row_f(x2, j);
    rows3_update(f0, w2, y2);
    if (F_ROWS > 1u) {
        rows3_update(f1, w0, y1);
        rows3_update(f1, w1, y2);
        let y3 = row_f(x3, j);
        rows3_update(f1, w2, y3);
        if (F_ROWS > 2u) {
            rows3_update(f2, w0, y2);
            rows3_update(f2, w1, y3);
            rows3_update(f3, w0, y3);
            let y4 = row_f(x4, j);
            rows3_update(f2, w2, y4);
            rows3_update(f3, w1, y4);
            let y5 = row_f(x5, j);
            rows3_update(f3, w2, y5);
        }
    }
}

// F_K3 = 1: 3x3 kernels at stride 1, dilation 1, F_ROWS output rows from oy.
fn conv_rows(n: u32, oy: u32, ox0: u32, m0: u32, share: bool, own: u32, live: bool) {
    let hw = P.h * P.w;
    let iy0 = i32(oy) - i32(P.ph);
    let ix0 = i32(ox0) - i32(P.pw);
    let wl0 = w_base(m0 + own);
    let wl1 = w_base(m0 + 8u + own);
    var f0 = array<vec4<f32>, 32>();
    var f1 = array<vec4<f32>, 32>();
    var f2 = array<vec4<f32>, 32>();
    var f3 = array<vec4<f32>, 32>();
    var i0 = bias_init(m0);
    var i1 = i0;
    var i2 = i0;
    var i3 = i0;
    let ih = i32(P.h);
    let ok0 = iy0 >= 0 && iy0 < ih;
    let ok1 = iy0 + 1 >= 0 && iy0 + 1 < ih;
    let ok2 = iy0 + 2 >= 0 && iy0 + 2 < ih;
    let ok3 = iy0 + 3 >= 0 && iy0 + 3 < ih;
    let ok4 = iy0 + 4 >= 0 && iy0 + 4 < ih;
    let ok5 = iy0 + 5 >= 0 && iy0 + 5 < ih;
    let r0 = u32(select(0, iy0, ok0)) * P.w;
    let r1 = u32(select(0, iy0 + 1, ok1)) * P.w;
    let r2 = u32(select(0, iy0 + 2, ok2)) * P.w;
    let r3 = u32(select(0, iy0 + 3, ok3)) * P.w;
    let r4 = u32(select(0, iy0 + 4, ok4)) * P.w;
    let r5 = u32(select(0, iy0 + 5, ok5)) * P.w;
    for (var tq = 0u; tq < P.cq; tq++) {
        let xc = (n * P.cq + tq) * hw;
        let wq = tq * 9u;
        // This lane's weight words of the 3 kernel rows (channel m0 + own, and m0 + 8 + own).
        let a0 = wq3(wl0 + wq);
        let a1 = wq3(wl0 + wq + 3u);
        let a2 = wq3(wl0 + wq + 6u);
        var b0 = vec3<u32>(0u);
        var b1 = vec3<u32>(0u);
        var b2 = vec3<u32>(0u);
        if (F_O > 8u) {
            b0 = wq3(wl1 + wq);
            b1 = wq3(wl1 + wq + 3u);
            b2 = wq3(wl1 + wq + 6u);
        }
        let ww0 = w_words(share, a0, b0, m0, wq);
        let ww1 = w_words(share, a1, b1, m0, wq + 3u);
        let ww2 = w_words(share, a2, b2, m0, wq + 6u);
        let x0 = row_words(xc + r0, ix0, ok0);
        let x1 = row_words(xc + r1, ix0, ok1);
        let x2 = row_words(xc + r2, ix0, ok2);
        var x3: Row;
        var x4: Row;
        var x5: Row;
        if (F_ROWS > 1u) {
            x3 = row_words(xc + r3, ix0, ok3);
        }
        if (F_ROWS > 2u) {
            x4 = row_words(xc + r4, ix0, ok4);
            x5 = row_words(xc + r5, ix0, ok5);
        }
        // Output row oy + r takes kernel row t from input row r + t; channel 4tq + j, the
        // four lanes unrolled (constant lane offsets).
        lane_rows(0u, ww0, ww1, ww2, x0, x1, x2, x3, x4, x5, &f0, &f1, &f2, &f3);
        lane_rows(1u, ww0, ww1, ww2, x0, x1, x2, x3, x4, x5, &f0, &f1, &f2, &f3);
        lane_rows(2u, ww0, ww1, ww2, x0, x1, x2, x3, x4, x5, &f0, &f1, &f2, &f3);
        lane_rows(3u, ww0, ww1, ww2, x0, x1, x2, x3, x4, x5, &f0, &f1, &f2, &f3);
        if (flush_after(tq)) {
            flush(&f0, &i0);
            if (F_ROWS > 1u) {
                flush(&f1, &i1);
            }
            if (F_ROWS > 2u) {
                flush(&f2, &i2);
                flush(&f3, &i3);
            }
        }
    }
    store_row(&i0, n, oy, ox0, m0, live);
    if (F_ROWS > 1u) {
        store_row(&i1, n, oy + 1u, ox0, m0, live && oy + 1u < P.oh);
    }
    if (F_ROWS > 2u) {
        store_row(&i2, n, oy + 2u, ox0, m0, live && oy + 2u < P.oh);
        store_row(&i3, n, oy + 3u, ox0, m0, live && oy + 3u < P.oh);
    }
}

// One input channel (lane j of the tap's words) of conv_taps' update: f += w[m][j] * (lo, hi)
// lane j, for the F_O channels.
fn lane_taps(j: u32, w: array<vec4<f32>, 16>, lo: vec4<u32>, hi: vec4<u32>,
             f: ptr<function, array<vec4<f32>, 32>>) {
    let l = lanes4(lo, j);
    let h = lanes4(hi, j);
    (*f)[0] = fma(vec4<f32>(w[0][j]), l, (*f)[0]);
    (*f)[1] = fma(vec4<f32>(w[0][j]), h, (*f)[1]);
    (*f)[2] = fma(vec4<f32>(w[1][j]), l, (*f)[2]);
    (*f)[3] = fma(vec4<f32>(w[1][j]), h, (*f)[3]);
    (*f)[4] = fma(vec4<f32>(w[2][j]), l, (*f)[4]);
    (*f)[5] = fma(vec4<f32>(w[2][j]), h, (*f)[5]);
    (*f)[6] = fma(vec4<f32>(w[3][j]), l, (*f)[6]);
    (*f)[7] = fma(vec4<f32>(w[3][j]), h, (*f)[7]);
    (*f)[8] = fma(vec4<f32>(w[4][j]), l, (*f)[8]);
    (*f)[9] = fma(vec4<f32>(w[4][j]), h, (*f)[9]);
    (*f)[10] = fma(vec4<f32>(w[5][j]), l, (*f)[10]);
    (*f)[11] = fma(vec4<f32>(w[5][j]), h, (*f)[11]);
    (*f)[12] = fma(vec4<f32>(w[6][j]), l, (*f)[12]);
    (*f)[13] = fma(vec4<f32>(w[6][j]), h, (*f)[13]);
    (*f)[14] = fma(vec4<f32>(w[7][j]), l, (*f)[14]);
    (*f)[15] = fma(vec4<f32>(w[7][j]), h, (*f)[15]);
    if (F_O > 8u) {
        (*f)[16] = fma(vec4<f32>(w[8][j]), l, (*f)[16]);
        (*f)[17] = fma(vec4<f32>(w[8][j]), h, (*f)[17]);
        (*f)[18] = fma(vec4<f32>(w[9][j]), l, (*f)[18]);
        (*f)[19] = fma(vec4<f32>(w[9][j]), h, (*f)[19]);
        (*f)[20] = fma(vec4<f32>(w[10][j]), l, (*f)[20]);
        (*f)[21] = fma(vec4<f32>(w[10][j]), h, (*f)[21]);
        (*f)[22] = fma(vec4<f32>(w[11][j]), l, (*f)[22]);
        (*f)[23] = fma(vec4<f32>(w[11][j]), h, (*f)[23]);
        (*f)[24] = fma(vec4<f32>(w[12][j]), l, (*f)[24]);
        (*f)[25] = fma(vec4<f32>(w[12][j]), h, (*f)[25]);
        (*f)[26] = fma(vec4<f32>(w[13][j]), l, (*f)[26]);
        (*f)[27] = fma(vec4<f32>(w[13][j]), h, (*f)[27]);
        (*f)[28] = fma(vec4<f32>(w[14][j]), l, (*f)[28]);
        (*f)[29] = fma(vec4<f32>(w[14][j]), h, (*f)[29]);
        (*f)[30] = fma(vec4<f32>(w[15][j]), l, (*f)[30]);
        (*f)[31] = fma(vec4<f32>(w[15][j]), h, (*f)[31]);
    }
}

// F_K3 = 0: any kernel, stride and dilation; one output row.
fn conv_taps(n: u32, oy: u32, ox0: u32, m0: u32, share: bool, own: u32, live: bool) {
    let hw = P.h * P.w;
    let khw = P.kh * P.kw;
    let wl0 = w_base(m0 + own);
    let wl1 = w_base(m0 + 8u + own);
    var f = array<vec4<f32>, 32>();
    var acc = bias_init(m0);
    let iyb = i32(oy * P.sh) - i32(P.ph);
    let ixb = i32(ox0 * P.sw) - i32(P.pw);
    let sw = i32(P.sw);
    for (var tq = 0u; tq < P.cq; tq++) {
        let xc = (n * P.cq + tq) * hw;
        for (var ky = 0u; ky < P.kh; ky++) {
            let iy = iyb + i32(ky * P.dh);
            let row_ok = iy >= 0 && iy < i32(P.h);
            let xr = xc + u32(select(0, iy, row_ok)) * P.w;
            for (var kx = 0u; kx < P.kw; kx++) {
                let wk = tq * khw + ky * P.kw + kx;
                let ix = ixb + i32(kx * P.dw);
                let lo = vec4<u32>(xw(xr, ix, row_ok), xw(xr, ix + sw, row_ok),
                                   xw(xr, ix + 2 * sw, row_ok), xw(xr, ix + 3 * sw, row_ok));
                let hi = vec4<u32>(xw(xr, ix + 4 * sw, row_ok), xw(xr, ix + 5 * sw, row_ok),
                                   xw(xr, ix + 6 * sw, row_ok), xw(xr, ix + 7 * sw, row_ok));
                var w = array<vec4<f32>, 16>();
                if (share) {
                    var b = vec4<f32>(0.0);
                    if (F_O > 8u) {
                        b = unpack4f(wt[wl1 + wk]);
                    }
                    w = share_taps(unpack4f(wt[wl0 + wk]), b, F_O > 8u);
                } else {
                    w[0] = unpack4f(wt[w_base(m0 + 0u) + wk]);
                    w[1] = unpack4f(wt[w_base(m0 + 1u) + wk]);
                    w[2] = unpack4f(wt[w_base(m0 + 2u) + wk]);
                    w[3] = unpack4f(wt[w_base(m0 + 3u) + wk]);
                    w[4] = unpack4f(wt[w_base(m0 + 4u) + wk]);
                    w[5] = unpack4f(wt[w_base(m0 + 5u) + wk]);
                    w[6] = unpack4f(wt[w_base(m0 + 6u) + wk]);
                    w[7] = unpack4f(wt[w_base(m0 + 7u) + wk]);
                    if (F_O > 8u) {
                        w[8] = unpack4f(wt[w_base(m0 + 8u) + wk]);
                        w[9] = unpack4f(wt[w_base(m0 + 9u) + wk]);
                        w[10] = unpack4f(wt[w_base(m0 + 10u) + wk]);
                        w[11] = unpack4f(wt[w_base(m0 + 11u) + wk]);
                        w[12] = unpack4f(wt[w_base(m0 + 12u) + wk]);
                        w[13] = unpack4f(wt[w_base(m0 + 13u) + wk]);
                        w[14] = unpack4f(wt[w_base(m0 + 14u) + wk]);
                        w[15] = unpack4f(wt[w_base(m0 + 15u) + wk]);
                    }
                }
                // The four input channels of the word, unrolled (constant lane offsets).
                lane_taps(0u, w, lo, hi, &f);
                lane_taps(1u, w, lo, hi, &f);
                lane_taps(2u, w, lo, hi, &f);
                lane_taps(3u, w, lo, hi, &f);
            }
        }
        if (flush_after(tq)) {
            flush(&f, &acc);
        }
    }
    store_row(&acc, n, oy, ox0, m0, live);
}

@compute @workgroup_size(F_WG)
fn conv2d_f(@builtin(local_invocation_index) li: u32,
            @builtin(workgroup_id) wid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let tile = wid.x + wid.y * nwg.x;
    // Grid padding: uniform over the whole workgroup.
    if (tile >= P.count) {
        return;
    }
    let mtiles = (P.o + F_O - 1u) / F_O;
    let mt = tile % mtiles;
    let pt = tile / mtiles;
    let rows = select(1u, F_ROWS, F_K3 == 1u);
    let owb = (P.ow + 7u) / 8u;
    let ohr = (P.oh + rows - 1u) / rows;
    let blocks = P.n * ohr;
    let q = pt * F_WG + li;
    let live = q / owb < blocks;
    // A subgroup with no live invocation leaves as a whole (uniform over the subgroup).
    if (share_all(!live)) {
        return;
    }
    let qc = select(blocks * owb - 1u, q, live);
    let rg = qc / owb;
    let n = rg / ohr;
    let oy = (rg % ohr) * rows;
    let ox0 = (qc % owb) * 8u;
    let m0 = mt * F_O;
    let share = share_ok();
    let own = share_rank() & 7u;
    if (F_K3 == 1u) {
        conv_rows(n, oy, ox0, m0, share, own, live);
    } else {
        conv_taps(n, oy, ox0, m0, share, own, live);
    }
}
