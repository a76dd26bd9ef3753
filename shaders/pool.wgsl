// pool.wgsl: 2-D max pooling (NCHW, square kernel and stride, no padding, floor mode) and
// requires: lib/float_bits.wgsl
// log_softmax along dim 1 of [N, C]. Match src/reference/layers.rs: max pooling exactly
// (same window order, the first NaN of a window is returned, tested on the bit pattern, never
// through max()); log_softmax as (x - max) - ln(sum exp(x - max)) per row, up to summation order
// and exp/log accuracy. A row whose max is NaN or +-inf (NaN or +inf anywhere, or all -inf)
// gives NaN everywhere, as PyTorch's kernel does.
//
// Bindings (group 0):
//   @group(0) @binding(0) P:   uniform Params  max_pool2d: count (outputs), c, h, w (input),
//                              oh, ow (output), kernel, stride; log_softmax: count (rows),
//                              cols (C)
//   @group(0) @binding(1) x:   storage, read array<f32>  input ([N, C, H, W] or [N, C])
//   @group(0) @binding(2) out: storage, read_write array<f32>  output
//
// Entry points and dispatch shapes (grids tiled over x and y past 65,535 workgroups):
//   max_pool2d (0-2): one invocation per output element; workgroup (WG, 1, 1), WG an override
//     constant (default 256); count = N*C*OH*OW items, flat index gid.x + gid.y * nwg.x * WG,
//     bounds-checked.
//   log_softmax (0-2): one workgroup of 256 per row (max, then sum of exp, reduced in
//     workgroup memory); count = N workgroups, flat id wid.x + wid.y * nwg.x.
//   log_softmax_row (0-2): one invocation per row (max, sum of exp and the outputs in one
//     invocation, no workgroup memory or barrier): for rows of few columns (the launcher's
//     LOG_SOFTMAX_ROW_MAX), where a workgroup's 18 barriers cost more than the row; workgroup
//     (WG, 1, 1), count = N items, flat index as max_pool2d. Same arithmetic per row, the sum
//     in column order.

override WG: u32 = 256u;

const RED: u32 = 256u;

struct Params {
    count: u32,
    c: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kernel: u32,
    stride: u32,
    cols: u32,
    _pad0: u32,
    _pad1: u32,
    _pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> out: array<f32>;

var<workgroup> red: array<f32, 256>;

// NaN or +-inf.
fn not_finite(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) >= 0x7f800000u;
}

@compute @workgroup_size(WG)
fn max_pool2d(@builtin(global_invocation_id) gid: vec3<u32>,
              @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = gid.x + gid.y * (nwg.x * WG);
    if (i >= P.count) {
        return;
    }
    let ox = i % P.ow;
    var t = i / P.ow;
    let oy = t % P.oh;
    let nc = t / P.oh;
    let base = nc * P.h * P.w + (oy * P.stride) * P.w + ox * P.stride;
    var m = bitcast<f32>(0xff800000u); // -inf
    var found_nan = false;
    for (var ky = 0u; ky < P.kernel && !found_nan; ky = ky + 1u) {
        let row = base + ky * P.w;
        for (var kx = 0u; kx < P.kernel; kx = kx + 1u) {
            let v = x[row + kx];
            if (is_nan(v)) {
                m = v;
                found_nan = true;
                break;
            }
            if (v > m) {
                m = v;
            }
        }
    }
    out[i] = m;
}

// max that returns the first NaN it sees (a before b).
fn max_nan(a: f32, b: f32) -> f32 {
    if (is_nan(a)) {
        return a;
    }
    if (is_nan(b)) {
        return b;
    }
    return select(a, b, b > a);
}

@compute @workgroup_size(256)
fn log_softmax(@builtin(local_invocation_index) li: u32,
               @builtin(workgroup_id) wid: vec3<u32>,
               @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = wid.x + wid.y * nwg.x;
    if (row >= P.count) {
        return;
    }
    let base = row * P.cols;
    var m = bitcast<f32>(0xff800000u); // -inf
    for (var j = li; j < P.cols; j = j + RED) {
        m = max_nan(m, x[base + j]);
    }
    red[li] = m;
    workgroupBarrier();
    for (var s = RED / 2u; s > 0u; s = s >> 1u) {
        if (li < s) {
            red[li] = max_nan(red[li], red[li + s]);
        }
        workgroupBarrier();
    }
    let row_max = red[0];
    workgroupBarrier();
    // No early return here: the barriers below must stay in uniform control flow.
    let bad = not_finite(row_max);
    var sum = 0.0;
    for (var j = li; j < P.cols; j = j + RED) {
        sum = sum + exp(x[base + j] - row_max);
    }
    red[li] = sum;
    workgroupBarrier();
    for (var s = RED / 2u; s > 0u; s = s >> 1u) {
        if (li < s) {
            red[li] = red[li] + red[li + s];
        }
        workgroupBarrier();
    }
    let lse = log(red[0]);
    let nan = bitcast<f32>(0x7fc00000u);
    for (var j = li; j < P.cols; j = j + RED) {
        out[base + j] = select((x[base + j] - row_max) - lse, nan, bad);
    }
}

@compute @workgroup_size(WG)
fn log_softmax_row(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = gid.x + gid.y * (nwg.x * WG);
    if (row >= P.count) {
        return;
    }
    let base = row * P.cols;
    var m = bitcast<f32>(0xff800000u); // -inf
    for (var j = 0u; j < P.cols; j = j + 1u) {
        m = max_nan(m, x[base + j]);
    }
    let bad = not_finite(m);
    var sum = 0.0;
    for (var j = 0u; j < P.cols; j = j + 1u) {
        sum = sum + exp(x[base + j] - m);
    }
    let lse = log(sum);
    let nan = bitcast<f32>(0x7fc00000u);
    for (var j = 0u; j < P.cols; j = j + 1u) {
        out[base + j] = select((x[base + j] - m) - lse, nan, bad);
    }
}
