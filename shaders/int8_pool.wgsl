// int8_pool.wgsl: integer pooling and table lookups on packed codes (the deployed forms of
// ONNX MaxPool with pads, GlobalAveragePool and elementwise activations such as HardSwish),
// bit-exact with src/reference/int8.rs: max_pool2d_pad_int8, global_avg_pool_int8 and
// lookup_int8.
// requires: lib/requant.wgsl
//
// Packed layout: as int8.wgsl ("channel quads"): NCHW codes are u32 words [N, CQ, H, W],
// CQ = ceil(C / 4), byte j of word (n, q, y, x) the code of channel 4q + j, padding lanes 0.
//
// Bindings (group 0):
//   @group(0) @binding(0) params: uniform PoolParams  count (work items), c (C), cq (CQ),
//                                 inner (words per channel quad: H*W), h, w, oh, ow, kernel
//                                 (kh, kw), stride (sh, sw), padding (ph, pw), x_zp, and the
//                                 requantization of global average pooling: mode (0 f32,
//                                 1 fixed point), scale, multiplier, shift, out_zp, lo, hi
//   @group(0) @binding(1) a:      storage, read array<u32>  packed input codes
//   @group(0) @binding(2) out:    storage, read_write array<u32>  packed output codes
//   @group(0) @binding(3) table:  uniform CodeTable  lookup: 256 codes, entry q + 128 in byte
//                                 (q + 128) % 4 of word (q + 128) / 4
//
// Entry points and dispatch shapes: all with workgroup (WG, 1, 1) (WG an override constant, default 256), a
// 1-D grid of `count` items tiled over x and y past 65,535 workgroups (flat index
// gid.x + gid.y * num_workgroups.x * WG, bounds-checked):
//   max_pool2d_pad (0, 1, 2): one output word [N, CQ, OH, OW] per item; lane-wise max over
//     the window's positions inside the input (padding never wins).
//   global_avg_pool (0, 1, 2): one output word [N, CQ] per item: per lane the exact i32 sum
//     of (code - x_zp) over the H*W words of its quad, requantized (requant_code or
//     float_requant_code of lib/requant.wgsl); padding lanes 0.
//   lookup (0, 1, 2, 3): one word per item (count = outer * CQ * inner): each valid lane
//     replaced by its table entry; padding lanes 0.

override WG: u32 = 256u;

struct PoolParams {
    count: u32,
    c: u32,
    cq: u32,
    inner: u32,
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
    x_zp: i32,
    mode: u32,
    scale: f32,
    mult: i32,
    shift: i32,
    out_zp: i32,
    lo: i32,
    hi: i32,
    _pad0: u32,
    _pad1: u32,
}

struct CodeTable {
    words: array<vec4<u32>, 16>,
}

@group(0) @binding(0) var<uniform> params: PoolParams;
@group(0) @binding(1) var<storage, read> a: array<u32>;
@group(0) @binding(2) var<storage, read_write> out: array<u32>;
@group(0) @binding(3) var<uniform> table: CodeTable;

fn pool_index(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * (nwg.x * WG);
}

// The code in lane j of a word, sign-extended.
fn code_of(word: u32, j: u32) -> i32 {
    return extractBits(bitcast<i32>(word), 8u * j, 8u);
}

fn lane_of(code: i32, j: u32) -> u32 {
    return (bitcast<u32>(code) & 0xffu) << (8u * j);
}

@compute @workgroup_size(WG)
fn max_pool2d_pad(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = pool_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let ox = t % params.ow;
    let oy = (t / params.ow) % params.oh;
    let plane = t / (params.ow * params.oh);
    let base = plane * params.h * params.w;
    var m = vec4<i32>(-128);
    for (var ky = 0u; ky < params.kh; ky++) {
        // Padded coordinates: y = oy * sh + ky - ph, skipped when outside [0, h).
        let yp = oy * params.sh + ky;
        if (yp < params.ph || yp - params.ph >= params.h) {
            continue;
        }
        let row = base + (yp - params.ph) * params.w;
        for (var kx = 0u; kx < params.kw; kx++) {
            let xp = ox * params.sw + kx;
            if (xp < params.pw || xp - params.pw >= params.w) {
                continue;
            }
            let word = a[row + xp - params.pw];
            m = max(m, vec4<i32>(code_of(word, 0u), code_of(word, 1u), code_of(word, 2u),
                                 code_of(word, 3u)));
        }
    }
    // Padding lanes hold 0 in every input word, so their max is 0 (padding < kernel leaves
    // every window at least one input position).
    out[t] = lane_of(m.x, 0u) | lane_of(m.y, 1u) | lane_of(m.z, 2u) | lane_of(m.w, 3u);
}

@compute @workgroup_size(WG)
fn global_avg_pool(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = pool_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let q = t % params.cq;
    let base = t * params.inner;
    var acc = vec4<i32>(0);
    for (var i = 0u; i < params.inner; i++) {
        let word = a[base + i];
        acc += vec4<i32>(code_of(word, 0u), code_of(word, 1u), code_of(word, 2u),
                         code_of(word, 3u));
    }
    // sum(code - x_zp) = sum(code) - x_zp * H*W; |sum| <= 255 * 2^23 < 2^31.
    acc -= vec4<i32>(params.x_zp * i32(params.inner));
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        if (4u * q + j >= params.c) {
            break;
        }
        var code: i32;
        if (params.mode == 0u) {
            code = float_requant_code(acc[j], params.scale, params.out_zp, params.lo, params.hi);
        } else {
            code = requant_code(acc[j], params.mult, params.shift, params.out_zp, params.lo,
                                params.hi);
        }
        word |= lane_of(code, j);
    }
    out[t] = word;
}

@compute @workgroup_size(WG)
fn lookup(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = pool_index(gid, nwg);
    if (t >= params.count) {
        return;
    }
    let q = (t / params.inner) % params.cq;
    let word_in = a[t];
    var word = 0u;
    for (var j = 0u; j < 4u; j++) {
        if (4u * q + j >= params.c) {
            break;
        }
        let k = u32(code_of(word_in, j) + 128);
        let tw = table.words[k / 16u][(k / 4u) % 4u];
        word |= lane_of(code_of(tw, k % 4u), j);
    }
    out[t] = word;
}
