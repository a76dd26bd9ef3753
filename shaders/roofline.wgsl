// roofline.wgsl: the two kernels that measure what the device can do, for the benchmark
// suite (src/bench/): `copy_vec4` (memory bandwidth: vec4<f32> loads and stores, EPT vec4s per
// invocation) and `fma_chains` (arithmetic throughput: CHAINS independent vec4 fma chains per
// invocation kept in registers, one vec4 store at the end). Both are tuned at run time by
// sweeping the override constants WG (workgroup size), EPT (vec4s per invocation, copy) and
// CHAINS (vec4 accumulators per invocation, fma: 2, 4, 8 or 16).
//
// Bindings (group 0):
//   @group(0) @binding(0) params: uniform Params   n4 (vec4 elements of src/dst), iters (fma
//                                                  loop trip count), a, b (fma operands:
//                                                  acc = fma(acc, a, b), chosen by the host so
//                                                  the values stay finite)
//   @group(0) @binding(1) src:    storage, read       array<vec4<f32>>  copy input, n4 vec4s
//   @group(0) @binding(2) dst:    storage, read_write array<vec4<f32>>  copy output, n4 vec4s;
//                                                  fma: one vec4 per invocation (if t < n4)
//
// Entry points and dispatch (workgroup size (WG, 1, 1), WG an override constant):
//   copy_vec4 (0,1,2): workgroup g (= wid.x + wid.y * num_workgroups.x) copies the vec4s
//                 g*WG*EPT + k*WG + lid for k < EPT (coalesced: consecutive invocations touch
//                 consecutive vec4s), bounds-checked against n4; grid ceil(n4 / (WG*EPT))
//                 workgroups, tiled over x and y.
//   fma_chains (0,2): invocation t (= gid.x + gid.y * num_workgroups.x * WG) runs `iters`
//                 iterations of CHAINS independent vec4 fmas (8 * CHAINS flops each) and
//                 stores the sum of its accumulators at dst[t] (if t < n4), so nothing is dead
//                 code; 1-D grid over the invocations, tiled over x and y.

override WG: u32 = 256u;
override EPT: u32 = 4u;
override CHAINS: u32 = 8u;

struct Params {
    n4: u32,
    iters: u32,
    a: f32,
    b: f32,
}

@group(0) @binding(0) var<uniform> params: Params;
@group(0) @binding(1) var<storage, read> src: array<vec4<f32>>;
@group(0) @binding(2) var<storage, read_write> dst: array<vec4<f32>>;

@compute @workgroup_size(WG)
fn copy_vec4(@builtin(workgroup_id) wid: vec3<u32>,
        @builtin(local_invocation_index) lid: u32,
        @builtin(num_workgroups) nwg: vec3<u32>) {
    let group = wid.x + wid.y * nwg.x;
    let base = group * (WG * EPT) + lid;
    for (var k = 0u; k < EPT; k = k + 1u) {
        let i = base + k * WG;
        if (i < params.n4) {
            dst[i] = src[i];
        }
    }
}

@compute @workgroup_size(WG)
fn fma_chains(@builtin(global_invocation_id) gid: vec3<u32>,
       @builtin(num_workgroups) nwg: vec3<u32>) {
    let t = gid.x + gid.y * (nwg.x * WG);
    let a = vec4<f32>(params.a);
    let b = vec4<f32>(params.b);
    let s = f32(t & 1023u) * 0.0009765625;
    var x0 = vec4<f32>(s, s + 0.01, s + 0.02, s + 0.03);
    var x1 = x0 + 0.1;
    var x2 = x0 + 0.2;
    var x3 = x0 + 0.3;
    var x4 = x0 + 0.4;
    var x5 = x0 + 0.5;
    var x6 = x0 + 0.6;
    var x7 = x0 + 0.7;
    var x8 = x0 + 0.8;
    var x9 = x0 + 0.9;
    var x10 = x0 + 1.0;
    var x11 = x0 + 1.1;
    var x12 = x0 + 1.2;
    var x13 = x0 + 1.3;
    var x14 = x0 + 1.4;
    var x15 = x0 + 1.5;
    for (var k = 0u; k < params.iters; k = k + 1u) {
        x0 = fma(x0, a, b);
        x1 = fma(x1, a, b);
        if (CHAINS > 2u) {
            x2 = fma(x2, a, b);
            x3 = fma(x3, a, b);
        }
        if (CHAINS > 4u) {
            x4 = fma(x4, a, b);
            x5 = fma(x5, a, b);
            x6 = fma(x6, a, b);
            x7 = fma(x7, a, b);
        }
        if (CHAINS > 8u) {
            x8 = fma(x8, a, b);
            x9 = fma(x9, a, b);
            x10 = fma(x10, a, b);
            x11 = fma(x11, a, b);
            x12 = fma(x12, a, b);
            x13 = fma(x13, a, b);
            x14 = fma(x14, a, b);
            x15 = fma(x15, a, b);
        }
    }
    var sum = x0 + x1;
    if (CHAINS > 2u) {
        sum = sum + x2 + x3;
    }
    if (CHAINS > 4u) {
        sum = sum + x4 + x5 + x6 + x7;
    }
    if (CHAINS > 8u) {
        sum = sum + x8 + x9 + x10 + x11 + x12 + x13 + x14 + x15;
    }
    if (t < params.n4) {
        dst[t] = sum;
    }
}
