// lib/dot4_portable.wgsl: the portable `dot4(a, b)` of int8_conv.wgsl: the dot product of the
// four signed 8-bit lanes of two u32 words (lane j = bits 8j..8j+7), by sign-extending
// extractBits and i32 multiply-adds. Each product is at most 2^14 in magnitude, so the sum is
// exact; the result equals WGSL's dot4I8Packed (lib/dot4_packed.wgsl).
//
// Bindings: none (functions only). Dispatch: none; it has no entry points.
// int8_conv.wgsl names this file in a `// requires:` line; src/kernels/int8.rs composes the
// conv module twice, once with this file and once with lib/dot4_packed.wgsl.

fn dot4(a: u32, b: u32) -> i32 {
    let x = bitcast<i32>(a);
    let y = bitcast<i32>(b);
    return extractBits(x, 0u, 8u) * extractBits(y, 0u, 8u)
        + extractBits(x, 8u, 8u) * extractBits(y, 8u, 8u)
        + extractBits(x, 16u, 8u) * extractBits(y, 16u, 8u)
        + extractBits(x, 24u, 8u) * extractBits(y, 24u, 8u);
}
