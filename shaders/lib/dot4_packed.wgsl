// lib/dot4_packed.wgsl: `dot4(a, b)` through WGSL's dot4I8Packed (language extension
// packed_4x8_integer_dot_product; naga lowers it to SPIR-V OpSDot where the device has the
// DotProductInput4x8BitPacked capability, else to an equivalent polyfill). Same result as
// lib/dot4_portable.wgsl: the exact i32 sum of the four signed 8-bit lane products.
//
// The split form of lib/dot4_portable.wgsl with nothing to split: `I8x4` is the packed word
// itself, `unpack4` the identity and `dot4u` dot4I8Packed.
//
// Bindings: none (functions only). Dispatch: none; it has no entry points.
// Only used when wgpu reports WgslLanguageFeatures::Packed4x8IntegerDotProduct (see
// GpuContext::int8_dot); src/kernels/int8.rs composes it in place of lib/dot4_portable.wgsl.

alias I8x4 = u32;

fn unpack4(a: u32) -> u32 {
    return a;
}

fn dot4u(a: u32, b: u32) -> i32 {
    return dot4I8Packed(a, b);
}

fn dot4(a: u32, b: u32) -> i32 {
    return dot4I8Packed(a, b);
}
