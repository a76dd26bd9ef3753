// int8.wgsl: elementwise integer (deployed int8) kernels on packed codes, bit-exact with
// requires: lib/float_bits.wgsl
// requires: lib/requant.wgsl
// src/reference/int8.rs: quantize (f32 -> codes), dequantize (codes -> f32), max_pool2d on
// codes, quantized add (TFLite integer add with clamp), repack (the same codes, row-major, seen
// with another shape, e.g. flatten [N, C, H, W] -> [N, C*H*W]), and requant_probe, which evaluates the
// lib/requant.wgsl functions on given operands (tests compare it with the Rust ones).
//
// Packed layout ("channel quads"): a tensor seen as [outer, C, inner] (C = dim 1; rank 1 is
// [1, C, 1]) is stored as u32 words [outer, CQ = ceil(C / 4), inner]; byte j (bits 8j..8j+7)
// of word (o, q, i) is the two's-complement code of element (o, 4q + j, i), and 0 where
// 4q + j >= C. For NCHW that is [N, CQ, H, W]; for [N, in] it is [N, ceil(in / 4)].
//
// Bindings (group 0):
//   @group(0) @binding(0) params: uniform Params  count (work items), c (C), cq (CQ), inner,
//                                 qinner and qchannels (per-channel qparams: channel of flat
//                                 element e is (e / qinner) % qchannels), quant_min, quant_max;
//                                 max_pool2d: h, w, oh, ow, kernel, stride; repack: c, cq,
//                                 inner of the output's [outer, C, inner] view, in_c and
//                                 in_inner of the input's
//   @group(0) @binding(1) src:    storage, read array<f32>  quantize input (row-major)
//   @group(0) @binding(2) qp:     storage, read array<u32>  qparams, 3*qchannels words: scale
//                                 (f32 bits), inv = 1/scale (f32 bits), zero point (i32)
//   @group(0) @binding(3) a:      storage, read array<u32>  packed codes (input; add: a)
//   @group(0) @binding(4) b:      storage, read array<u32>  packed codes (add: b)
//   @group(0) @binding(5) out:    storage, read_write array<u32>  packed codes (output)
//   @group(0) @binding(6) outf:   storage, read_write array<f32>  dequantize output
//   @group(0) @binding(7) status: storage, read_write array<atomic<u32>>  quantize: word 0 is
//                                 the smallest flat index of a NaN input (host sets 0xffffffff)
//   @group(0) @binding(8) addp:   uniform AddParams  quantized add zero points, multipliers,
//                                 shifts and clamp
//   @group(0) @binding(9) probe_in:  storage, read array<vec4<i32>>  (x, multiplier, shift,
//                                 exponent) per item
//   @group(0) @binding(10) probe_out: storage, read_write array<vec4<i32>>  (srdhm(x, m),
//                                 rdbp(x, exponent), mbqm(x, m, shift), sat_add(x, m))
//
// Entry points (bindings) and dispatch shapes; all use workgroup (WG, 1, 1), WG an override
// constant (default 256), and a 1-D grid over `count` items tiled over x and y past 65,535
// workgroups (flat index gid.x + gid.y * num_workgroups.x * WG, bounds-checked):
//   quantize (0, 1, 2, 5, 7): one packed output word per item (count = outer * CQ * inner).
//   dequantize (0, 2, 3, 6): one f32 output element per item (count = outer * C * inner).
//   max_pool2d (0, 3, 5): one output word [N, CQ, OH, OW] per item; lane-wise max of codes.
//   add (0, 3, 4, 5, 8): one word per item (count = outer * CQ * inner); padding lanes 0.
//   repack (0, 3, 5): one output word per item (count = outer * CQ * inner of the output
//     view); lane j of output word (o, q, i) is the code of row-major element
//     e = (o * C + 4q + j) * inner + i, read from the input word holding element e in the
//     input view [in_outer, in_c, in_inner]; padding lanes 0.
//   requant_probe (0, 9, 10): one vec4 per item.
//   float_probe (0, 9, 10): one vec4 per item: in (acc, f32 bits of scale, out_zp, 0), out
//     (f32 bits of i32_to_f32_rn(acc), float_requant_code(acc, scale, out_zp, -128, 127), 0, 0).

override WG: u32 = 256u;

struct Params {
    count: u32,
    c: u32,
    cq: u32,
    inner: u32,
    qinner: u32,
    qchannels: u32,
    quant_min: i32,
    quant_max: i32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kernel: u32,
    stride: u32,
    in_c: u32,
    in_inner: u32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<f32>;
@group(0) @binding(2) var<storage, read> qp: array<u32>;
@group(0) @binding(3) var<storage, read> a: array<u32>;
@group(0) @binding(4) var<storage, read> b: array<u32>;
@group(0) @binding(5) var<storage, read_write> out: array<u32>;
@group(0) @binding(6) var<storage, read_write> outf: array<f32>;
@group(0) @binding(7) var<storage, read_write> status: array<atomic<u32>>;
@group(0) @binding(8) var<uniform> addp: AddParams;
@group(0) @binding(9) var<storage, read> probe_in: array<vec4<i32>>;
@group(0) @binding(10) var<storage, read_write> probe_out: array<vec4<i32>>;

fn flat_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * (nwg.x * WG);
}

fn qchannel(e: u32) -> u32 {
    if (params.qchannels <= 1u) {
        return 0u;
    }
    return (e / params.qinner) % params.qchannels;
}

// Lane j of a packed word, sign-extended.
fn lane(word: u32, j: u32) -> i32 {
    return extractBits(bitcast<i32>(word), 8u * j, 8u);
}

// A code in lane j (the low 8 bits of the two's-complement value).
fn to_lane(code: i32, j: u32) -> u32 {
    return (bitcast<u32>(code) & 0xffu) << (8u * j);
}

// reference::int8::quantize of one element (not NaN):
// clamp(round_ties_even(v * inv) + zp, qmin, qmax) in f32. Products of magnitude >= 2^24
// (and infinities) saturate by sign without any float arithmetic on them (nothing relies on
// inf), a NaN product (0 * inf when 1/scale overflowed) gives 0 as Rust's `NaN as i8` does.
fn quantize_one(v: f32, ch: u32) -> i32 {
    let inv = bitcast<f32>(qp[params.qchannels + ch]);
    let zp = bitcast<i32>(qp[2u * params.qchannels + ch]);
    let p = v * inv;
    let bits = bitcast<u32>(p);
    let mag = bits & 0x7fffffffu;
    if (mag > 0x7f800000u) {
        return 0;
    }
    if (mag >= 0x4b800000u) {
        return select(params.quant_max, params.quant_min, (bits >> 31u) != 0u);
    }
    let q = clamp(round(p) + f32(zp), f32(params.quant_min), f32(params.quant_max));
    return i32(q);
}

@compute @workgroup_size(WG)
fn quantize(@builtin(global_invocation_id) gid: vec3<u32>,
            @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let i = t % params.inner;
    let q = (t / params.inner) % params.cq;
    let o = t / (params.inner * params.cq);
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        let c = 4u * q + j;
        if (c >= params.c) {
            break;
        }
        let e = (o * params.c + c) * params.inner + i;
        let v = src[e];
        if (is_nan(v)) {
            atomicMin(&status[0], e);
            continue;
        }
        word |= to_lane(quantize_one(v, qchannel(e)), j);
    }
    out[t] = word;
}

@compute @workgroup_size(WG)
fn dequantize(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let e = flat_index(gid, nwg);
    if (e >= params.count) {
        return;
    }
    let i = e % params.inner;
    let c = (e / params.inner) % params.c;
    let o = e / (params.inner * params.c);
    let word = a[(o * params.cq + c / 4u) * params.inner + i];
    let ch = qchannel(e);
    let scale = bitcast<f32>(qp[ch]);
    let zp = bitcast<i32>(qp[2u * params.qchannels + ch]);
    outf[e] = (f32(lane(word, c % 4u)) - f32(zp)) * scale;
}

@compute @workgroup_size(WG)
fn max_pool2d(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let ox = t % params.ow;
    let oy = (t / params.ow) % params.oh;
    let plane = t / (params.ow * params.oh);
    let base = plane * params.h * params.w;
    var m = vec4<i32>(-128);
    for (var ky = 0u; ky < params.kernel; ky++) {
        let row = base + (oy * params.stride + ky) * params.w + ox * params.stride;
        for (var kx = 0u; kx < params.kernel; kx++) {
            let word = bitcast<i32>(a[row + kx]);
            let v = vec4<i32>(extractBits(word, 0u, 8u), extractBits(word, 8u, 8u),
                              extractBits(word, 16u, 8u), extractBits(word, 24u, 8u));
            m = max(m, v);
        }
    }
    out[t] = to_lane(m.x, 0u) | to_lane(m.y, 1u) | to_lane(m.z, 2u) | to_lane(m.w, 3u);
}

@compute @workgroup_size(WG)
fn add(@builtin(global_invocation_id) gid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let q = (t / params.inner) % params.cq;
    let wa = a[t];
    let wb = b[t];
    let p = addp;
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        if (4u * q + j >= params.c) {
            break;
        }
        word |= to_lane(add_code(lane(wa, j), lane(wb, j), p), j);
    }
    out[t] = word;
}

@compute @workgroup_size(WG)
fn requant_probe(@builtin(global_invocation_id) gid: vec3<u32>,
                 @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let v = probe_in[t];
    probe_out[t] = vec4<i32>(srdhm(v.x, v.y), rdbp(v.x, u32(clamp(v.w, 0, 31))),
                             mbqm(v.x, v.y, v.z), sat_add(v.x, v.y));
}

@compute @workgroup_size(WG)
fn float_probe(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let v = probe_in[t];
    let f = i32_to_f32_rn(v.x);
    probe_out[t] = vec4<i32>(bitcast<i32>(f),
                             float_requant_code(v.x, bitcast<f32>(v.y), v.z, -128, 127), 0, 0);
}

@compute @workgroup_size(WG)
fn repack(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let i = t % params.inner;
    let q = (t / params.inner) % params.cq;
    let o = t / (params.inner * params.cq);
    let in_cq = (params.in_c + 3u) / 4u;
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        let c = 4u * q + j;
        if (c >= params.c) {
            break;
        }
        let e = (o * params.c + c) * params.inner + i;
        let ii = e % params.in_inner;
        let ic = (e / params.in_inner) % params.in_c;
        let io = e / (params.in_inner * params.in_c);
        let src_word = a[(io * in_cq + ic / 4u) * params.in_inner + ii];
        word |= ((src_word >> (8u * (ic % 4u))) & 0xffu) << (8u * j);
    }
    out[t] = word;
}
