// graph_ops.wgsl: the float ops an imported graph (src/onnx/eval.rs) needs beyond layers, each
// requires: lib/float_bits.wgsl
// requires: lib/exact_float.wgsl
// bit-exact with its CPU reference:
//   pool2d           src/reference/layers.rs pool2d: ONNX MaxPool / AveragePool (kernel, strides,
//                    dilations, per-side pads, ceil_mode, count_include_pad); the window walked
//                    row by row, max keeps v when v > m or v is NaN (from -inf), average sums
//                    from 0.0 in that order and divides once (div_rn: correctly rounded).
//   pad2d            src/reference/layers.rs zero_pad2d: zeros around an NCHW tensor.
//   global_avg_pool  src/reference/layers.rs global_avg_pool2d: ndarray's mean_axis, i.e. its
//                    unrolled_fold (8 partial sums over blocks of 8, combined as
//                    ((((0 + (p0+p4)) + (p1+p5)) + (p2+p6)) + (p3+p7)), then the < 8 tail
//                    elements in order), then one division by H*W.
//   binary           src/reference/layers.rs broadcast_binary: a + b or a * b with numpy
//                    broadcasting (strides 0 on broadcast dims), one rounding.
//   concat_copy      src/reference/layers.rs concat: one part copied into its slot.
//   fake_quant_onnx  src/reference/fake_quant.rs fake_quantize_onnx: ONNX QuantizeLinear then
//                    DequantizeLinear, q = clamp(round_even(div_rn(x, s)) + z) (NaN -> 0),
//                    y = f32(q - z) * s.
// Sums never end as -0.0 on the CPU (they start from +0.0), so a -0.0 sum is made +0.0 here
// (a driver may fold 0.0 + v to v).
//
// Bindings (group 0):
//   @group(0) @binding(0) P:   uniform Params  see the struct below; count = invocations
//   @group(0) @binding(1) x:   storage, read array<f32>  input (pool2d, global_avg_pool,
//                              concat_copy: the part, fake_quant_onnx), operand a (binary)
//   @group(0) @binding(2) out: storage, read_write array<f32>  output
//   @group(0) @binding(3) y:   storage, read array<f32>  operand b (binary)
//   @group(0) @binding(4) qp:  storage, read array<u32>  qparams (fake_quant_onnx): 3*C words,
//                              scale[C] (f32 bits), inv[C] (unused), zero_point[C] (i32 bits)
//
// Entry points (bindings) and dispatch shapes: workgroup (WG, 1, 1), WG an override constant
// (default 256), a 1-D grid tiled over x and y past 65,535 workgroups, flat index
// gid.x + gid.y * nwg.x * WG, bounds-checked against count:
//   pool2d (0-2): one invocation per output element, count = N*C*OH*OW.
//   pad2d (0-2): one invocation per output element, count = N*C*OH*OW; pads pt (top), pl
//     (left), input h, w.
//   global_avg_pool (0-2): one invocation per (n, c), count = N*C; inner = H*W.
//   binary (0-3): one invocation per output element; mode 0 add, 1 mul; rank <= 8 dims and
//     the operands' element strides (0 where broadcast) in dims / a_strides / b_strides.
//   concat_copy (0-2): one invocation per element of the part, count = its elements; element
//     i goes to (i / block_in) * block_out + offset + i % block_in. One launch per part.
//   fake_quant_onnx (0-2, 4): one invocation per element; channel (i / inner) % channels.

override WG: u32 = 256u;

struct Params {
    count: u32,
    mode: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kh: u32,
    kw: u32,
    sh: u32,
    sw: u32,
    dh: u32,
    dw: u32,
    pt: u32,
    pl: u32,
    pb: u32,
    pr: u32,
    rank: u32,
    inner: u32,
    channels: u32,
    qmin: i32,
    qmax: i32,
    block_in: u32,
    block_out: u32,
    offset: u32,
    dims: array<vec4<u32>, 2>,
    a_strides: array<vec4<u32>, 2>,
    b_strides: array<vec4<u32>, 2>,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;
@group(0) @binding(3) var<storage, read> y: array<f32>;
@group(0) @binding(4) var<storage, read> qp: array<u32>;

fn plus_zero(v: f32) -> f32 {
    if (bitcast<u32>(v) == 0x80000000u) {
        return from_bits(0u);
    }
    return v;
}

@compute @workgroup_size(WG)
fn pool2d(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= P.count) {
        return;
    }
    let ox = i % P.ow;
    let t = i / P.ow;
    let oy = t % P.oh;
    let plane = t / P.oh;
    let base = plane * P.h * P.w;
    let max_mode = P.mode == 0u;
    var acc = 0.0;
    if (max_mode) {
        acc = from_bits(0xff800000u);
    }
    var cnt = 0u;
    var pcnt = 0u;
    let hp = P.h + P.pt + P.pb;
    let wp = P.w + P.pl + P.pr;
    for (var ky = 0u; ky < P.kh; ky++) {
        let yp = oy * P.sh + ky * P.dh;
        for (var kx = 0u; kx < P.kw; kx++) {
            let xp = ox * P.sw + kx * P.dw;
            if (yp < hp && xp < wp) {
                pcnt += 1u;
            }
            if (yp < P.pt || xp < P.pl || yp - P.pt >= P.h || xp - P.pl >= P.w) {
                continue;
            }
            let v = x[base + (yp - P.pt) * P.w + (xp - P.pl)];
            cnt += 1u;
            if (max_mode) {
                if (v > acc || is_nan(v)) {
                    acc = v;
                }
            } else {
                acc = acc + v;
            }
        }
    }
    if (max_mode) {
        out[i] = acc;
        return;
    }
    var div = cnt;
    if (P.mode == 2u) {
        div = pcnt;
    }
    out[i] = div_rn(plus_zero(acc), f32(max(div, 1u)));
}

@compute @workgroup_size(WG)
fn pad2d(@builtin(global_invocation_id) gid: vec3<u32>,
         @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= P.count) {
        return;
    }
    let ox = i % P.ow;
    let t = i / P.ow;
    let oy = t % P.oh;
    let plane = t / P.oh;
    var v = 0.0;
    if (oy >= P.pt && ox >= P.pl && oy - P.pt < P.h && ox - P.pl < P.w) {
        v = x[(plane * P.h + (oy - P.pt)) * P.w + (ox - P.pl)];
    }
    out[i] = v;
}

@compute @workgroup_size(WG)
fn global_avg_pool(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= P.count) {
        return;
    }
    let n = P.inner;
    let base = i * n;
    var p0 = 0.0;
    var p1 = 0.0;
    var p2 = 0.0;
    var p3 = 0.0;
    var p4 = 0.0;
    var p5 = 0.0;
    var p6 = 0.0;
    var p7 = 0.0;
    var k = 0u;
    while (k + 8u <= n) {
        let j = base + k;
        p0 = p0 + x[j];
        p1 = p1 + x[j + 1u];
        p2 = p2 + x[j + 2u];
        p3 = p3 + x[j + 3u];
        p4 = p4 + x[j + 4u];
        p5 = p5 + x[j + 5u];
        p6 = p6 + x[j + 6u];
        p7 = p7 + x[j + 7u];
        k += 8u;
    }
    var acc = 0.0;
    acc = acc + (p0 + p4);
    acc = acc + (p1 + p5);
    acc = acc + (p2 + p6);
    acc = acc + (p3 + p7);
    for (; k < n; k++) {
        acc = acc + x[base + k];
    }
    out[i] = div_rn(plus_zero(acc), f32(n));
}

@compute @workgroup_size(WG)
fn binary(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= P.count) {
        return;
    }
    var rem = i;
    var ao = 0u;
    var bo = 0u;
    for (var d = 0u; d < P.rank; d++) {
        let ax = P.rank - 1u - d;
        let dim = P.dims[ax / 4u][ax % 4u];
        let c = rem % dim;
        rem = rem / dim;
        ao += c * P.a_strides[ax / 4u][ax % 4u];
        bo += c * P.b_strides[ax / 4u][ax % 4u];
    }
    let a = x[ao];
    let b = y[bo];
    if (P.mode == 0u) {
        out[i] = a + b;
    } else {
        out[i] = a * b;
    }
}

@compute @workgroup_size(WG)
fn concat_copy(@builtin(global_invocation_id) gid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= P.count) {
        return;
    }
    out[(i / P.block_in) * P.block_out + P.offset + i % P.block_in] = x[i];
}

@compute @workgroup_size(WG)
fn fake_quant_onnx(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= P.count) {
        return;
    }
    let ch = (i / P.inner) % P.channels;
    let s = bitcast<f32>(qp[ch]);
    let z = bitcast<i32>(qp[2u * P.channels + ch]);
    let r = round(div_rn(x[i], s)) + f32(z);
    var q = 0;
    if (!is_nan(r)) {
        q = i32(clamp(r, f32(P.qmin), f32(P.qmax)));
    }
    out[i] = f32(q - z) * s;
}
