// train.wgsl: the training ops of NNI's Mnist network not covered by conv2d / batch_norm /
// requires: lib/float_bits.wgsl
// activation: max pooling backward, a strided matmul (the linear backward's dx and dweight),
// log_softmax backward, NLL loss (mean) forward and backward and their fusion, top-1 correct
// count, and the SGD step. Match src/reference/train.rs and src/optim.rs: max pooling backward
// exactly (same argmax rule and summation order), SGD with the same fma order, the rest up to
// summation order and exp accuracy.
//
//   max_pool2d_backward: dx[plane, iy, ix] = sum, over the windows (oy, ox) covering (iy, ix) in
//     row-major order, of dy[plane, oy, ox] where the window's argmax is (iy, ix) (PyTorch's CPU
//     rule: scanning row by row, `v > max || isnan(v)` replaces; first max on ties, last NaN).
//   max_pool2d_backward_tiled: the same result when stride == kernel (windows do not
//     overlap): one invocation per window writes 0 + dy at its argmax; `out` is zeroed by the
//     launcher first (elements under no window stay 0).
//   matmul: out[m, n] = sum over k < inner of a[m*a_rs + k*a_cs] * b[k*b_rs + n*b_cs]
//     (rows = M, cols = N); strides make dy·W and dyᵀ·x the same kernel.
//   log_softmax_backward: per row, dx = dy - exp(y) * sum(dy).
//   nll_loss: out[0] = -(sum over rows of logp[n, label[n]]) / N; a label >= C gives NaN; N = 0
//     gives NaN.
//   nll_loss_backward: d[n, j] = scale at j = label[n] (scale = -1/N from the host), else 0.
//   log_softmax_nll_backward: d[n, j] = [j = label[n]] * scale - exp(logp[n, j]) * scale; a row
//     whose label is >= C is NaN.
//   count_correct: count[0] += number of rows whose argmax (first max on ties, NaN largest,
//     first NaN) equals the label; any label >= C sets count[0] = 0xffffffff (sticky poison).
//   sgd / sgd_plain: torch.optim.SGD per element (src/optim.rs Sgd::update):
//     d = fma(p, wd, g) if wd != 0; buf = d (first) or fma(d, 1 - dampening, buf * momentum);
//     d = fma(buf, momentum, d) (nesterov) or buf; p = fma(d, -lr, p). sgd_plain: no buffer.
//   add: out = a + b (residual adds, gradient accumulation).
//   col_sum: out[j] = sum over i < rows of a[i * cols + j], in row order (the linear
//     backward's dbias).
//   conv_wgrad_dw3: the weight gradient of a depthwise 3x3 conv (groups = C = O, stride 1,
//     dilation 1, padding (PH, PW) = (a_rs, a_cs)): out[c, 0, ky, kx] = sum over n < N (inner),
//     blocks of 4 output rows oy, ox < OW, of dy[n, c, oy, ox] (b) * x[n, c, oy + ky - PH,
//     ox + kx - PW] (a; zero outside the H x W input); one invocation per channel (count = C),
//     a window of 3 inputs sliding along each of the 6 input rows a block of 4 output rows
//     reads (10 loads per 36 fmas; one output row at a time took 16).
//   copy_at: out[p_off + i] = a[i] for i < count (a tensor copied into part of another as a
//     launch, so it stays in order inside a recording).
//   swap01: out[j, i, r] = a[i, j, r] for a [rows, cols, inner] (NCHW <-> CNHW).
//   flip_transpose: out[c, o, ky, kx] = a[o, c, KH-1-ky, KW-1-kx] for a weight [O, C, KH, KW]
//     (rows = O, cols = C, h = KH, w = KW): the weight of the conv that computes the input
//     gradient of a stride-1 conv. One invocation per input channel c and block of FLIP_O
//     output channels, count = C * ceil(O / FLIP_O).
//   observer_update: running observer statistics state [2, C] (row 0 minima, row 1 maxima)
//     combined in place with a batch's [2, C] min/max (src/reference/train.rs
//     observer_combine): the batch's on the first step; min / max with NaN propagating
//     (MinMaxObserver); old + c * (cur - old) with c = scale (moving average, flags 8).
//
// Bindings (group 0):
//   @group(0) @binding(0) P:      uniform Params  count (work items); rows, cols, inner (matmul
//                                 M, N, K; [N, C] of classification ops); c, h, w, oh, ow,
//                                 kernel, stride (pooling; c unused); a_rs, a_cs, b_rs, b_cs
//                                 (matmul strides); flags (sgd: 1 first, 2 nesterov,
//                                 4 weight decay; observer_update: 1 first, 8 moving
//                                 average); lr, momentum, dampening, weight_decay; scale
//                                 (-1/N for the NLL backward, the averaging constant);
//                                 p_off, g_off (sgd: first element of the parameter / the
//                                 gradient in their buffers; the momentum buffer starts at 0;
//                                 copy_at: first element written)
//   @group(0) @binding(1) a:      storage, read array<f32>  x (pooling) / A / y / logp / scores
//   @group(0) @binding(2) b:      storage, read array<f32>  dy / B / the gradient (sgd) /
//                                 the batch min/max (observer_update)
//   @group(0) @binding(3) out:    storage, read_write array<f32>  dx / out / loss / the
//                                 parameter (sgd) or observer state, updated in place
//   @group(0) @binding(4) labels: storage, read array<u32>  class labels [N]
//   @group(0) @binding(5) count:  storage, read_write array<u32>  [1] correct-count accumulator
//   @group(0) @binding(6) buf:    storage, read_write array<f32>  momentum buffer (sgd)
//
// Entry points and dispatch shapes (1-D grids tiled over x and y past 65,535 workgroups; flat
// index gid.x + gid.y * nwg.x * WG, bounds-checked against count):
//   max_pool2d_backward (0-3): one invocation per input element, workgroup (WG, 1, 1).
//   max_pool2d_backward_tiled (0-3): one invocation per output element (window),
//     count = planes * OH * OW.
//   matmul (0-3): one invocation per 4×4 output tile, count = ceil(M/4) * ceil(N/4), (WG, 1, 1).
//   log_softmax_backward (0-3): one invocation per row, (WG, 1, 1).
//   nll_loss (0, 1, 3, 4), count_correct (0, 1, 4, 5): a single workgroup of 256 that
//     reduces over all rows in workgroup memory; dispatch (1, 1, 1).
//   nll_loss_backward, log_softmax_nll_backward (0, 1, 3, 4): one invocation per element.
//   sgd (0, 2, 3, 6), sgd_plain (0, 2, 3): one invocation per parameter element.
//   add (0-3), swap01 (0, 1, 3), copy_at (0, 1, 3): one invocation per element;
//     flip_transpose (0, 1, 3): one per FLIP_O kernel windows.
//   col_sum (0, 1, 3): one invocation per column, count = cols.
//   observer_update (0, 2, 3): one invocation per statistic, count = 2 * C, rows = C.

override WG: u32 = 256u;

const RED: u32 = 256u;
const FIRST: u32 = 1u;
const NESTEROV: u32 = 2u;
const WEIGHT_DECAY: u32 = 4u;
const POISON: u32 = 0xffffffffu;
const MOVING_AVERAGE: u32 = 8u;

struct Params {
    count: u32,
    rows: u32,
    cols: u32,
    inner: u32,
    c: u32,
    h: u32,
    w: u32,
    oh: u32,
    ow: u32,
    kernel: u32,
    stride: u32,
    a_rs: u32,
    a_cs: u32,
    b_rs: u32,
    b_cs: u32,
    flags: u32,
    lr: f32,
    momentum: f32,
    dampening: f32,
    weight_decay: f32,
    scale: f32,
    p_off: u32,
    g_off: u32,
    _pad0: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> a: array<f32>;
@group(0) @binding(2) var<storage, read> b: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@group(0) @binding(4) var<storage, read> labels: array<u32>;
@group(0) @binding(5) var<storage, read_write> count: array<u32>;
@group(0) @binding(6) var<storage, read_write> buf: array<f32>;

var<workgroup> red: array<f32, 256>;
var<workgroup> redu: array<u32, 256>;

fn flat(gid: vec3<u32>, nwg: vec3<u32>) -> u32 {
    return gid.x + gid.y * (nwg.x * WG);
}

fn nan() -> f32 {
    return from_bits(0x7fc00000u);
}

// Flat index in the plane of the element the window at (y0, x0) selects.
fn window_argmax(plane: u32, y0: u32, x0: u32) -> u32 {
    var best = y0 * P.w + x0;
    var m = from_bits(0xff800000u); // -inf
    for (var ky = 0u; ky < P.kernel; ky = ky + 1u) {
        for (var kx = 0u; kx < P.kernel; kx = kx + 1u) {
            let i = (y0 + ky) * P.w + x0 + kx;
            let v = a[plane + i];
            if (v > m || is_nan(v)) {
                m = v;
                best = i;
            }
        }
    }
    return best;
}

@compute @workgroup_size(WG)
fn max_pool2d_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                       @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= P.count) {
        return;
    }
    let hw = P.h * P.w;
    let ix = i % P.w;
    let iy = (i / P.w) % P.h;
    let p = i / hw;
    let plane = p * hw;
    let me = iy * P.w + ix;
    let k = P.kernel;
    let s = P.stride;
    // Windows oy with oy*s <= iy <= oy*s + k - 1.
    var oy_lo = 0u;
    if (iy + 1u > k) {
        oy_lo = (iy + 1u - k + s - 1u) / s;
    }
    var ox_lo = 0u;
    if (ix + 1u > k) {
        ox_lo = (ix + 1u - k + s - 1u) / s;
    }
    let oy_end = min(iy / s + 1u, P.oh);
    let ox_end = min(ix / s + 1u, P.ow);
    var acc = 0.0;
    for (var oy = oy_lo; oy < oy_end; oy = oy + 1u) {
        for (var ox = ox_lo; ox < ox_end; ox = ox + 1u) {
            if (window_argmax(plane, oy * s, ox * s) == me) {
                acc = acc + b[(p * P.oh + oy) * P.ow + ox];
            }
        }
    }
    out[i] = acc;
}

@compute @workgroup_size(WG)
fn max_pool2d_backward_tiled(@builtin(global_invocation_id) gid: vec3<u32>,
                             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= P.count) {
        return;
    }
    let ox = i % P.ow;
    let oy = (i / P.ow) % P.oh;
    let p = i / (P.oh * P.ow);
    let plane = p * P.h * P.w;
    let at = window_argmax(plane, oy * P.stride, ox * P.stride);
    // 0 + dy as the accumulating kernel computes it: -0.0 becomes +0.0 (an integer test,
    // which no float simplification can drop).
    let d = b[i];
    out[plane + at] = select(d, 0.0, bitcast<u32>(d) == 0x80000000u);
}

@compute @workgroup_size(WG)
fn matmul(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat(gid, nwg);
    if (t >= P.count) {
        return;
    }
    let tiles_n = (P.cols + 3u) / 4u;
    let m0 = (t / tiles_n) * 4u;
    let n0 = (t % tiles_n) * 4u;
    // Clamped rows / columns: loads stay in bounds; only valid outputs are stored.
    var am: array<u32, 4>;
    var bn: array<u32, 4>;
    for (var r = 0u; r < 4u; r = r + 1u) {
        am[r] = min(m0 + r, P.rows - 1u) * P.a_rs;
        bn[r] = min(n0 + r, P.cols - 1u) * P.b_cs;
    }
    var acc: array<vec4<f32>, 4>;
    for (var k = 0u; k < P.inner; k = k + 1u) {
        let ak = k * P.a_cs;
        let bk = k * P.b_rs;
        let bv = vec4<f32>(b[bk + bn[0]], b[bk + bn[1]], b[bk + bn[2]], b[bk + bn[3]]);
        for (var r = 0u; r < 4u; r = r + 1u) {
            acc[r] = acc[r] + a[am[r] + ak] * bv;
        }
    }
    for (var r = 0u; r < 4u; r = r + 1u) {
        let m = m0 + r;
        if (m < P.rows) {
            for (var j = 0u; j < 4u; j = j + 1u) {
                if (n0 + j < P.cols) {
                    out[m * P.cols + n0 + j] = acc[r][j];
                }
            }
        }
    }
}

@compute @workgroup_size(WG)
fn log_softmax_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                        @builtin(num_workgroups) nwg: vec3<u32>) {
    let row = flat(gid, nwg);
    if (row >= P.count) {
        return;
    }
    let base = row * P.cols;
    var sum = 0.0;
    for (var j = 0u; j < P.cols; j = j + 1u) {
        sum = sum + b[base + j];
    }
    for (var j = 0u; j < P.cols; j = j + 1u) {
        out[base + j] = b[base + j] - exp(a[base + j]) * sum;
    }
}

@compute @workgroup_size(256)
fn nll_loss(@builtin(local_invocation_index) li: u32) {
    var acc = 0.0;
    for (var n = li; n < P.rows; n = n + RED) {
        let l = labels[n];
        if (l < P.cols) {
            acc = acc + a[n * P.cols + l];
        } else {
            acc = nan();
        }
    }
    red[li] = acc;
    workgroupBarrier();
    for (var s = RED / 2u; s > 0u; s = s >> 1u) {
        if (li < s) {
            red[li] = red[li] + red[li + s];
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        if (P.rows == 0u) {
            out[0] = nan();
        } else {
            out[0] = -red[0] / f32(P.rows);
        }
    }
}

@compute @workgroup_size(WG)
fn nll_loss_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                     @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= P.count) {
        return;
    }
    let l = labels[i / P.cols];
    let j = i % P.cols;
    if (l >= P.cols) {
        out[i] = nan();
    } else {
        out[i] = select(0.0, P.scale, j == l);
    }
}

@compute @workgroup_size(WG)
fn log_softmax_nll_backward(@builtin(global_invocation_id) gid: vec3<u32>,
                            @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= P.count) {
        return;
    }
    let l = labels[i / P.cols];
    let j = i % P.cols;
    if (l >= P.cols) {
        out[i] = nan();
    } else {
        out[i] = select(0.0, P.scale, j == l) - exp(a[i]) * P.scale;
    }
}

// torch.argmax of a row: first max on ties, NaN larger than everything (first NaN).
fn row_argmax(base: u32) -> u32 {
    var best = 0u;
    var m = a[base];
    for (var j = 1u; j < P.cols; j = j + 1u) {
        let v = a[base + j];
        if (!is_nan(m) && (v > m || is_nan(v))) {
            m = v;
            best = j;
        }
    }
    return best;
}

@compute @workgroup_size(256)
fn count_correct(@builtin(local_invocation_index) li: u32) {
    var correct = 0u;
    var bad = 0u;
    for (var n = li; n < P.rows; n = n + RED) {
        let l = labels[n];
        if (l >= P.cols) {
            bad = 1u;
        } else if (row_argmax(n * P.cols) == l) {
            correct = correct + 1u;
        }
    }
    // Correct counts in the low 31 bits' range (rows < 2^31), the poison flag apart.
    red[li] = f32(bad);
    redu[li] = correct;
    workgroupBarrier();
    for (var s = RED / 2u; s > 0u; s = s >> 1u) {
        if (li < s) {
            redu[li] = redu[li] + redu[li + s];
            red[li] = max(red[li], red[li + s]);
        }
        workgroupBarrier();
    }
    if (li == 0u) {
        let prev = count[0];
        if (red[0] > 0.0 || prev == POISON) {
            count[0] = POISON;
        } else {
            count[0] = prev + redu[0];
        }
    }
}

// The SGD direction before momentum: g, plus weight decay.
fn sgd_grad(p: f32, g: f32) -> f32 {
    if ((P.flags & WEIGHT_DECAY) != 0u) {
        return fma(p, P.weight_decay, g);
    }
    return g;
}

@compute @workgroup_size(WG)
fn sgd(@builtin(global_invocation_id) gid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= P.count) {
        return;
    }
    let p = out[P.p_off + i];
    var d = sgd_grad(p, b[P.g_off + i]);
    var m: f32;
    if ((P.flags & FIRST) != 0u) {
        m = d;
    } else {
        m = fma(d, 1.0 - P.dampening, buf[i] * P.momentum);
    }
    buf[i] = m;
    if ((P.flags & NESTEROV) != 0u) {
        d = fma(m, P.momentum, d);
    } else {
        d = m;
    }
    out[P.p_off + i] = fma(d, -P.lr, p);
}

@compute @workgroup_size(WG)
fn sgd_plain(@builtin(global_invocation_id) gid: vec3<u32>,
             @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= P.count) {
        return;
    }
    let p = out[P.p_off + i];
    out[P.p_off + i] = fma(sgd_grad(p, b[P.g_off + i]), -P.lr, p);
}

@compute @workgroup_size(WG)
fn observer_update(@builtin(global_invocation_id) gid: vec3<u32>,
                   @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= P.count) {
        return;
    }
    let cur = b[i];
    let old = out[i];
    var v = cur;
    if ((P.flags & FIRST) == 0u) {
        if ((P.flags & MOVING_AVERAGE) != 0u) {
            v = old + P.scale * (cur - old);
        } else if (is_nan(old) || is_nan(cur)) {
            v = nan();
        } else if (i >= P.rows) {
            v = select(old, cur, cur > old);
        } else {
            v = select(old, cur, cur < old);
        }
    }
    out[i] = v;
}

@compute @workgroup_size(WG)
fn add(@builtin(global_invocation_id) gid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= P.count) {
        return;
    }
    out[i] = a[i] + b[i];
}

@compute @workgroup_size(WG)
fn swap01(@builtin(global_invocation_id) gid: vec3<u32>,
          @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= P.count) {
        return;
    }
    // i indexes the output [cols, rows, inner].
    let r = i % P.inner;
    let t = i / P.inner;
    let row = t % P.rows;
    let col = t / P.rows;
    out[i] = a[(row * P.cols + col) * P.inner + r];
}

// Output channels per invocation of flip_transpose (FLIP_O in src/kernels/train.rs).
const FLIP_O: u32 = 8u;

@compute @workgroup_size(WG)
fn flip_transpose(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = flat(gid, nwg);
    if (t >= P.count) {
        return;
    }
    // t = b * C + c: the windows (c, o) of the output [C, O, KH, KW] for the FLIP_O output
    // channels o of block b, FLIP_O * KH * KW consecutive values written in order; the
    // invocations of a SIMD group take consecutive input channels c, so each window they read
    // together is one contiguous run of the input (one invocation per window read each
    // window's KH * KW values from a page of its own: 0.7 GB/s on lavapipe). Each window's
    // flip in both dimensions reverses its values (two divisions per invocation, none per
    // value: integer division is a per-lane scalar loop on CPU adapters).
    let c = t % P.cols;
    let o0 = (t / P.cols) * FLIP_O;
    let o_end = min(o0 + FLIP_O, P.rows);
    let khw = P.h * P.w;
    for (var o = o0; o < o_end; o = o + 1u) {
        let dst = (c * P.rows + o) * khw;
        let src = (o * P.cols + c) * khw + khw - 1u;
        for (var k = 0u; k < khw; k = k + 1u) {
            out[dst + k] = a[src - k];
        }
    }
}

// Output rows per step of conv_wgrad_dw3: its 6 input rows are loaded once per column for
// the 4 output rows that read them.
const DW3_ROWS: u32 = 4u;

// Where input row iy of plane `plane` starts (row 0 outside the input) and whether it is in it.
fn dw3_row(plane: u32, iy: i32) -> vec2<u32> {
    let ok = iy >= 0 && iy < i32(P.h);
    return vec2<u32>(plane + u32(select(0, iy, ok)) * P.w, u32(ok));
}

// dy of output row oy (0 past the last row), column ox, of the plane starting at dplane.
fn dw3_dy(dplane: u32, oy: u32, ox: u32) -> vec3<f32> {
    let live = oy < P.oh;
    return vec3<f32>(select(0.0, b[dplane + select(0u, oy, live) * P.ow + ox], live));
}

@compute @workgroup_size(WG)
fn conv_wgrad_dw3(@builtin(global_invocation_id) gid: vec3<u32>,
                  @builtin(num_workgroups) nwg: vec3<u32>) {
    let c = flat(gid, nwg);
    if (c >= P.count) {
        return;
    }
    let hw = P.h * P.w;
    let ohw = P.oh * P.ow;
    // s_k: the kernel row k's three taps.
    var s0 = vec3<f32>(0.0);
    var s1 = vec3<f32>(0.0);
    var s2 = vec3<f32>(0.0);
    let ix0 = -i32(P.a_cs);
    for (var n = 0u; n < P.inner; n = n + 1u) {
        let plane = (n * P.count + c) * hw;
        let dplane = (n * P.count + c) * ohw;
        for (var oy0 = 0u; oy0 < P.oh; oy0 = oy0 + DW3_ROWS) {
            // Input rows iy0 .. iy0 + 5 serve output rows oy0 .. oy0 + 3 (kernel row k of
            // output row r reads input row r + k); rows past OH read dy as zero.
            let iy0 = i32(oy0) - i32(P.a_rs);
            let q0 = dw3_row(plane, iy0);
            let q1 = dw3_row(plane, iy0 + 1);
            let q2 = dw3_row(plane, iy0 + 2);
            let q3 = dw3_row(plane, iy0 + 3);
            let q4 = dw3_row(plane, iy0 + 4);
            let q5 = dw3_row(plane, iy0 + 5);
            // The window (columns ox - PW .. ox - PW + 2) of each input row: a, b, then c.
            var a0 = dw3_x(q0.x, q0.y != 0u, ix0);
            var b0 = dw3_x(q0.x, q0.y != 0u, ix0 + 1);
            var a1 = dw3_x(q1.x, q1.y != 0u, ix0);
            var b1 = dw3_x(q1.x, q1.y != 0u, ix0 + 1);
            var a2 = dw3_x(q2.x, q2.y != 0u, ix0);
            var b2 = dw3_x(q2.x, q2.y != 0u, ix0 + 1);
            var a3 = dw3_x(q3.x, q3.y != 0u, ix0);
            var b3 = dw3_x(q3.x, q3.y != 0u, ix0 + 1);
            var a4 = dw3_x(q4.x, q4.y != 0u, ix0);
            var b4 = dw3_x(q4.x, q4.y != 0u, ix0 + 1);
            var a5 = dw3_x(q5.x, q5.y != 0u, ix0);
            var b5 = dw3_x(q5.x, q5.y != 0u, ix0 + 1);
            for (var ox = 0u; ox < P.ow; ox = ox + 1u) {
                let ix = i32(ox) + ix0 + 2;
                let c0 = dw3_x(q0.x, q0.y != 0u, ix);
                let c1 = dw3_x(q1.x, q1.y != 0u, ix);
                let c2 = dw3_x(q2.x, q2.y != 0u, ix);
                let c3 = dw3_x(q3.x, q3.y != 0u, ix);
                let c4 = dw3_x(q4.x, q4.y != 0u, ix);
                let c5 = dw3_x(q5.x, q5.y != 0u, ix);
                let v0 = vec3<f32>(a0, b0, c0);
                let v1 = vec3<f32>(a1, b1, c1);
                let v2 = vec3<f32>(a2, b2, c2);
                let v3 = vec3<f32>(a3, b3, c3);
                let v4 = vec3<f32>(a4, b4, c4);
                let v5 = vec3<f32>(a5, b5, c5);
                let d0 = dw3_dy(dplane, oy0, ox);
                let d1 = dw3_dy(dplane, oy0 + 1u, ox);
                let d2 = dw3_dy(dplane, oy0 + 2u, ox);
                let d3 = dw3_dy(dplane, oy0 + 3u, ox);
                s0 = fma(d0, v0, s0);
                s1 = fma(d0, v1, s1);
                s2 = fma(d0, v2, s2);
                s0 = fma(d1, v1, s0);
                s1 = fma(d1, v2, s1);
                s2 = fma(d1, v3, s2);
                s0 = fma(d2, v2, s0);
                s1 = fma(d2, v3, s1);
                s2 = fma(d2, v4, s2);
                s0 = fma(d3, v3, s0);
                s1 = fma(d3, v4, s1);
                s2 = fma(d3, v5, s2);
                a0 = b0;
                b0 = c0;
                a1 = b1;
                b1 = c1;
                a2 = b2;
                b2 = c2;
                a3 = b3;
                b3 = c3;
                a4 = b4;
                b4 = c4;
                a5 = b5;
                b5 = c5;
            }
        }
    }
    let o = c * 9u;
    out[o] = s0.x;
    out[o + 1u] = s0.y;
    out[o + 2u] = s0.z;
    out[o + 3u] = s1.x;
    out[o + 4u] = s1.y;
    out[o + 5u] = s1.z;
    out[o + 6u] = s2.x;
    out[o + 7u] = s2.y;
    out[o + 8u] = s2.z;
}

// x (binding a) at row offset `row` (of a row inside the input when `rok`), column ix, or 0.
fn dw3_x(row: u32, rok: bool, ix: i32) -> f32 {
    let ok = rok && ix >= 0 && ix < i32(P.w);
    return select(0.0, a[select(0u, row + u32(ix), ok)], ok);
}

@compute @workgroup_size(WG)
fn copy_at(@builtin(global_invocation_id) gid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let i = flat(gid, nwg);
    if (i >= P.count) {
        return;
    }
    out[P.p_off + i] = a[i];
}

@compute @workgroup_size(WG)
fn col_sum(@builtin(global_invocation_id) gid: vec3<u32>,
           @builtin(num_workgroups) nwg: vec3<u32>) {
    let j = flat(gid, nwg);
    if (j >= P.count) {
        return;
    }
    var acc = 0.0;
    for (var i = 0u; i < P.rows; i = i + 1u) {
        acc = acc + a[i * P.cols + j];
    }
    out[j] = acc;
}
