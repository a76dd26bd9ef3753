// lib/share_portable.wgsl: lib/share_subgroup.wgsl's names without subgroup operations, for
// devices without wgpu::Features::SUBGROUP: share_ok() is false, so int8_conv_f.wgsl has
// every invocation load its own weights and never calls share_words3 / share_taps (defined
// here only so the module is complete); share_all(b) is b (a per-invocation early exit, which
// is fine without subgroup operations); share_rank() is 0.
//
// Bindings: none (functions only). Dispatch: none; it has no entry points.

fn share_ok() -> bool {
    return false;
}

fn share_rank() -> u32 {
    return 0u;
}

fn share_all(b: bool) -> bool {
    return b;
}

fn share_words3(a: vec3<u32>, b: vec3<u32>, sixteen: bool) -> array<vec3<u32>, 16> {
    var w = array<vec3<u32>, 16>();
    for (var i = 0u; i < 8u; i++) {
        w[i] = a;
        w[i + 8u] = select(vec3<u32>(0u), b, sixteen);
    }
    return w;
}

fn share_taps(a: vec4<f32>, b: vec4<f32>, sixteen: bool) -> array<vec4<f32>, 16> {
    var w = array<vec4<f32>, 16>();
    for (var i = 0u; i < 8u; i++) {
        w[i] = a;
        w[i + 8u] = select(vec4<f32>(0.0), b, sixteen);
    }
    return w;
}
