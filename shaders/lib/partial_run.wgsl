// lib/partial_run.wgsl: how a per-channel reduction without barriers splits a channel among
// its partial invocations (batch_norm.wgsl, conv_bn.wgsl; the host's count is
// kernels::batch_norm::partial_count): partial g of `parts` takes the contiguous run
// [g * L, (g + 1) * L) of the channel's `units` values (L = ceil(units / parts)), clipped to
// the channel.
//
// Bindings: none (functions only). Dispatch: none; it has no entry points.
// Shaders name it in a `// requires: lib/partial_run.wgsl` line; their launchers prepend it.
fn partial_run(g: u32, units: u32, parts: u32) -> vec2<u32> {
    let len = (units + parts - 1u) / parts;
    return vec2<u32>(min(units, g * len), min(units, (g + 1u) * len));
}
