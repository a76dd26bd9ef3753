// lib/activation.wgsl: the activations of fused epilogues, one definition for every shader
// (activation.wgsl, batch_norm.wgsl, conv2d.wgsl), matching src/reference/activation.rs:
// code 0 identity, 1 ReLU, 2 ReLU6, 3 LeakyReLU(slope), 4 Hardswish. NaN propagates in the
// forward (explicit bit test); the backward at a NaN input passes d for ReLU/ReLU6 (PyTorch's
// threshold_backward / hardtanh_backward) and gives NaN for Hardswish.
// requires: lib/float_bits.wgsl
//
// Bindings: none (functions only). Dispatch: none; it has no entry points.

fn act_apply(v: f32, code: u32, slope: f32) -> f32 {
    // Branches on the (uniform) code only; NaN passes through by a select, so a CPU adapter
    // running invocations as SIMD lanes does not take every case under a mask.
    if (code == 0u) {
        return v;
    }
    var y: f32;
    if (code == 3u) {
        y = select(v * slope, v, v > 0.0);
    } else if (code == 4u) {
        y = v * clamp(v + 3.0, 0.0, 6.0) / 6.0;
    } else {
        y = select(v, 0.0, v < 0.0);
        if (code == 2u) {
            y = select(y, 6.0, v > 6.0);
        }
    }
    return select(y, v, is_nan(v));
}

fn act_grad(v: f32, d: f32, code: u32, slope: f32) -> f32 {
    if (code == 0u) {
        return d;
    }
    if (code == 3u) {
        return select(d * slope, d, v > 0.0);
    }
    if (code == 4u) {
        if (is_nan(v)) {
            return v;
        }
        if (v < -3.0) {
            return 0.0;
        }
        if (v >= 3.0) {
            return d;
        }
        return d * (v / 3.0 + 0.5);
    }
    if (is_nan(v)) {
        return d;
    }
    if (code == 2u) {
        return select(0.0, d, v > 0.0 && v < 6.0);
    }
    return select(0.0, d, v > 0.0);
}
