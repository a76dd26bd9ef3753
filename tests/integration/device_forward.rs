//! The device-resident float forward (`nn::DeviceChain`, `model::mnist::device_forward`):
//! on the CPU backend it equals `Module::forward` exactly (the same reference ops); on the GPU
//! it matches within float tolerance, unfused and after `fuse_modules` (BatchNorm folded on
//! the device at preparation); modules it cannot run are refused with a typed error.

use crate::common;

use ndarray::ArrayD;
use qfuse::backend::{CpuBackend, Device, GpuBackend};
use qfuse::fuse::{fuse_modules, FuseOptions};
use qfuse::model::mnist;
use qfuse::nn::{DeviceChain, Module};
use qfuse::Error;

fn trained_mnist() -> Module {
    let mut m = mnist::mnist(3).unwrap();
    m.eval();
    mnist::set_trained_bn_stats(&mut m, &mnist::synthetic_batch(16, 1), 5).unwrap();
    m
}

fn fused(m: &Module) -> Module {
    let mut m = m.clone();
    fuse_modules(
        &mut m,
        ["conv1", "batchnorm1", "relu1"],
        FuseOptions::default(),
    )
    .unwrap()
    .unwrap_or(m)
}

fn max_abs_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn cpu_chain_equals_module_forward() {
    let mut m = trained_mnist();
    let x = mnist::synthetic_batch(4, 2).into_dyn();
    let want = m.forward(&CpuBackend, &x).unwrap();
    let chain = mnist::device_forward(&m, CpuBackend).unwrap();
    let got = CpuBackend
        .download(&chain.forward(&CpuBackend.upload(&x).unwrap()).unwrap())
        .unwrap();
    assert_eq!(got, want);
    let mut f = fused(&m);
    let want = f.forward(&CpuBackend, &x).unwrap();
    let chain = mnist::device_forward(&f, CpuBackend).unwrap();
    let got = CpuBackend
        .download(&chain.forward(&CpuBackend.upload(&x).unwrap()).unwrap())
        .unwrap();
    assert!(
        max_abs_diff(&got, &want) <= 1e-5,
        "{}",
        max_abs_diff(&got, &want)
    );
}

fn gpu_chain_matches_the_cpu_reference() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx);
    let x = mnist::synthetic_batch(8, 4).into_dyn();
    for m in [trained_mnist(), fused(&trained_mnist())] {
        let want = m.clone().forward(&CpuBackend, &x).unwrap();
        let chain = mnist::device_forward(&m, gpu.clone()).unwrap();
        let y = chain.forward(&gpu.upload(&x).unwrap()).unwrap();
        assert_eq!(y.shape(), &[8, 10]);
        let got = gpu.download(&y).unwrap();
        let d = max_abs_diff(&got, &want);
        assert!(d <= 1e-3, "max |gpu - cpu| = {d}");
    }
}

fn what_a_chain_cannot_run_is_a_typed_error() {
    let mut chain = DeviceChain::new(CpuBackend);
    let seq = Module::sequential([Module::relu()]);
    let e = chain.push("body", &seq).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e}");
    assert!(e.to_string().contains("`body`"), "{e}");
    let mut chain = DeviceChain::new(CpuBackend);
    chain
        .push("pool", &Module::max_pool2d(2, 2).unwrap())
        .unwrap();
    let bad = CpuBackend.upload(&ArrayD::zeros(vec![1, 2, 3])).unwrap();
    assert!(chain.forward(&bad).is_err());
}

crate::qfuse_tests! {
    cpu_chain_equals_module_forward,
    gpu_chain_matches_the_cpu_reference: gpu,
    what_a_chain_cannot_run_is_a_typed_error,
}
