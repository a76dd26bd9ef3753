// lib/float_bits.wgsl: bit-level f32 helpers shared by the shaders: is_nan by bit pattern
// (drivers may fold `x != x` away, and WGSL min/max/clamp leave NaN unspecified) and
// from_bits (a float from its bits at run time, so no const-expression is ever inf or NaN).
//
// Bindings: none (functions only). Dispatch: none; it has no entry points.
// Shaders name it in a `// requires: lib/float_bits.wgsl` line; their launchers prepend it.
// A float from its bits at run time (so no const-expression is ever inf or NaN).
fn from_bits(bits: u32) -> f32 {
    return bitcast<f32>(bits);
}

fn is_nan(v: f32) -> bool {
    return (bitcast<u32>(v) & 0x7fffffffu) > 0x7f800000u;
}
