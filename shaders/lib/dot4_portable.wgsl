// lib/dot4_portable.wgsl: the portable `dot4(a, b)` of int8_conv.wgsl: the dot product of the
// four signed 8-bit lanes of two u32 words (lane j = bits 8j..8j+7), by sign-extending
// extractBits and i32 multiply-adds. Each product is at most 2^14 in magnitude, so the sum is
// exact; the result equals WGSL's dot4I8Packed (lib/dot4_packed.wgsl).
//
// Also the split form the conv kernel's inner loop uses, so that a word read once is unpacked
// once however many dot products it enters: `I8x4` (here vec4<i32>, the sign-extended lanes),
// `unpack4(word) -> I8x4` and `dot4u(a: I8x4, b: I8x4) -> i32`, with
// dot4u(unpack4(a), unpack4(b)) == dot4(a, b). lib/dot4_packed.wgsl defines the same names
// with I8x4 = u32 (no unpacking, dot4I8Packed).
//
// Bindings: none (functions only). Dispatch: none; it has no entry points.
// int8_conv.wgsl names this file in a `// requires:` line; src/kernels/int8.rs composes the
// conv module twice, once with this file and once with lib/dot4_packed.wgsl.

alias I8x4 = vec4<i32>;

fn unpack4(a: u32) -> vec4<i32> {
    let x = bitcast<i32>(a);
    return vec4<i32>(extractBits(x, 0u, 8u), extractBits(x, 8u, 8u), extractBits(x, 16u, 8u),
                     extractBits(x, 24u, 8u));
}

fn dot4u(a: vec4<i32>, b: vec4<i32>) -> i32 {
    let p = a * b;
    return p.x + p.y + p.z + p.w;
}

fn dot4(a: u32, b: u32) -> i32 {
    return dot4u(unpack4(a), unpack4(b));
}
