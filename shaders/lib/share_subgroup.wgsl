// lib/share_subgroup.wgsl: the weight sharing of int8_conv_f.wgsl through subgroup operations
// (wgpu::Features::SUBGROUP): `share_ok()` says whether subgroup lanes 0..7 are all active
// (then lane l, l < 8, loads the weights of output channels m0 + l and m0 + 8 + l and the
// others take them by broadcast), `share_rank()` is the lane's rank among the active lanes
// (its subgroup_invocation_id for lanes 0..7 when share_ok()), `share_all(b)` is
// subgroupAll(b) (a subgroup-uniform early exit), and `share_words3` / `share_taps` broadcast
// the values of lanes 0..7 (and their second set, when `sixteen`) to every lane.
// lib/share_portable.wgsl defines the same names without subgroups (share_ok() false: every
// invocation loads its own weights); src/kernels/int8.rs composes int8_conv_f.wgsl with one
// or the other, as it does the dot products.
//
// Bindings: none (functions only). Dispatch: none; it has no entry points. All of them must
// be called in subgroup-uniform control flow.

fn share_ok() -> bool {
    return (subgroupBallot(true).x & 0xffu) == 0xffu;
}

fn share_rank() -> u32 {
    return subgroupExclusiveAdd(1u);
}

fn share_all(b: bool) -> bool {
    return subgroupAll(b);
}

// Entries 0..7: lanes 0..7's `a`; entries 8..15: their `b` when `sixteen`, else zero.
// Packed weight words (4 channels each), so one broadcast serves four input channels.
fn share_words3(a: vec3<u32>, b: vec3<u32>, sixteen: bool) -> array<vec3<u32>, 16> {
    var w = array<vec3<u32>, 16>();
    w[0] = subgroupBroadcast(a, 0u);
    w[1] = subgroupBroadcast(a, 1u);
    w[2] = subgroupBroadcast(a, 2u);
    w[3] = subgroupBroadcast(a, 3u);
    w[4] = subgroupBroadcast(a, 4u);
    w[5] = subgroupBroadcast(a, 5u);
    w[6] = subgroupBroadcast(a, 6u);
    w[7] = subgroupBroadcast(a, 7u);
    if (sixteen) {
        w[8] = subgroupBroadcast(b, 0u);
        w[9] = subgroupBroadcast(b, 1u);
        w[10] = subgroupBroadcast(b, 2u);
        w[11] = subgroupBroadcast(b, 3u);
        w[12] = subgroupBroadcast(b, 4u);
        w[13] = subgroupBroadcast(b, 5u);
        w[14] = subgroupBroadcast(b, 6u);
        w[15] = subgroupBroadcast(b, 7u);
    }
    return w;
}

// share_words3 for vec4<f32> values (the unpacked lanes of one word per channel).
fn share_taps(a: vec4<f32>, b: vec4<f32>, sixteen: bool) -> array<vec4<f32>, 16> {
    var w = array<vec4<f32>, 16>();
    w[0] = subgroupBroadcast(a, 0u);
    w[1] = subgroupBroadcast(a, 1u);
    w[2] = subgroupBroadcast(a, 2u);
    w[3] = subgroupBroadcast(a, 3u);
    w[4] = subgroupBroadcast(a, 4u);
    w[5] = subgroupBroadcast(a, 5u);
    w[6] = subgroupBroadcast(a, 6u);
    w[7] = subgroupBroadcast(a, 7u);
    if (sixteen) {
        w[8] = subgroupBroadcast(b, 0u);
        w[9] = subgroupBroadcast(b, 1u);
        w[10] = subgroupBroadcast(b, 2u);
        w[11] = subgroupBroadcast(b, 3u);
        w[12] = subgroupBroadcast(b, 4u);
        w[13] = subgroupBroadcast(b, 5u);
        w[14] = subgroupBroadcast(b, 6u);
        w[15] = subgroupBroadcast(b, 7u);
    }
    return w;
}
