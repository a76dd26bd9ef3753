// lib/partial_run.wgsl: how a per-channel reduction without barriers splits a channel among
// its partial invocations (batch_norm.wgsl, conv_bn.wgsl; the host's count is
// kernels::batch_norm::partial_count): partial g of `parts` takes the contiguous run
// [g * L, (g + 1) * L) of the channel's `units` values (L = ceil(units / parts)), clipped to
// the channel. Also the layout of statistics partials and the Welford step on vec4s that
// writes them (batch_norm.wgsl's statistics pass, and conv2d.wgsl's forward_dw, whose
// statistics epilogue writes the same partials for the BatchNorm after the conv).
//
// Bindings: none (functions only). Dispatch: none; it has no entry points.
// Shaders name it in a `// requires: lib/partial_run.wgsl` line; their launchers prepend it.
fn partial_run(g: u32, units: u32, parts: u32) -> vec2<u32> {
    let len = (units + parts - 1u) / parts;
    return vec2<u32>(min(units, g * len), min(units, (g + 1u) * len));
}

// Where partial g of channel c lies in a statistics-partials array of C channels x `parts`
// partials, [3, C, parts]: its count, mean and M2 = sum (x - mean)^2.
fn stats_slot(c: u32, g: u32, channels: u32, parts: u32) -> vec3<u32> {
    let cg = channels * parts;
    let k = c * parts + g;
    return vec3<u32>(k, cg + k, 2u * cg + k);
}

// Welford's running mean and M2 per lane of a stream of vec4s (every lane the same count).
struct Welford4 {
    cnt: f32,
    mean: vec4<f32>,
    m2: vec4<f32>,
}

fn welford4_new() -> Welford4 {
    return Welford4(0.0, vec4<f32>(0.0), vec4<f32>(0.0));
}

fn welford4_add(w: ptr<function, Welford4>, v: vec4<f32>) {
    (*w).cnt = (*w).cnt + 1.0;
    let d = v - (*w).mean;
    (*w).mean = (*w).mean + d / (*w).cnt;
    (*w).m2 = (*w).m2 + d * (v - (*w).mean);
}

// (count, mean, M2) of the four lanes combined (Chan et al., equal counts), for a stream fed
// less `shift` (the shift is added back to the means: a large mean costs no precision).
fn welford4_total(w: Welford4, shift: vec4<f32>) -> vec3<f32> {
    let mean = w.mean + shift;
    let d01 = mean.y - mean.x;
    let d23 = mean.w - mean.z;
    let mean01 = mean.x + 0.5 * d01;
    let mean23 = mean.z + 0.5 * d23;
    let m2_01 = w.m2.x + w.m2.y + d01 * d01 * (0.5 * w.cnt);
    let m2_23 = w.m2.z + w.m2.w + d23 * d23 * (0.5 * w.cnt);
    let dq = mean23 - mean01;
    return vec3<f32>(4.0 * w.cnt, mean01 + 0.5 * dq, m2_01 + m2_23 + dq * dq * w.cnt);
}
