//! The PTQ simulation on the device (`nn::DeviceChain` with fake-quant targets,
//! `config::calibrate` generic over the backend, `QuantOps::observe_running`): on the CPU
//! backend it equals the host-array path (`config::calibrate_host`, `Module::forward`) bit
//! for bit; on the GPU the observer steps equal the CPU's bit for bit, a calibrated forward
//! is one upload and one download, and calibration downloads nothing per batch.

use crate::common;

use ndarray::ArrayD;
use qfuse::backend::{Backend, CpuBackend, Device, GpuBackend, QuantOps};
use qfuse::config::{self, ConfigList, QuantMode};
use qfuse::model::mnist;
use qfuse::nn::{Container, DeviceChain, Module};
use qfuse::quant::{ObserverSpec, QDtype, QScheme, QuantRange};
use qfuse::Error;

fn model() -> Module {
    let mut m = mnist::mnist(21).unwrap();
    m.eval();
    mnist::set_trained_bn_stats(&mut m, &mnist::synthetic_batch(8, 1), 3).unwrap();
    m
}

fn batch(n: usize, seed: u64) -> ArrayD<f32> {
    mnist::synthetic_batch(n, seed).into_dyn()
}

/// NNI's example config, and one with every target (bias included) of every conv and
/// linear, per channel, unfused.
fn configs() -> Vec<ConfigList> {
    vec![
        mnist::nni_example_config(),
        ConfigList::from_json(
            r#"[{"op_types": ["Conv2d", "Linear"], "granularity": "per_channel",
                 "quant_scheme": "symmetric"},
                {"op_names": ["relu3"], "target_names": ["_output_"], "quant_dtype": "uint8"}]"#,
        )
        .unwrap(),
    ]
}

fn chain_out<B: Backend>(b: &B, m: &Module, x: &ArrayD<f32>) -> ArrayD<f32> {
    let chain = mnist::device_forward(m, b.clone()).unwrap();
    b.download(&chain.forward(&b.upload(x).unwrap()).unwrap())
        .unwrap()
}

fn device_calibration_equals_the_host_path_on_the_cpu() {
    let calib = [batch(4, 2), batch(4, 3)];
    let x = batch(5, 4);
    for cfg in configs() {
        let mut dev = model();
        config::apply(&mut dev, &cfg, QuantMode::Ptq).unwrap();
        let mut host = dev.clone();
        assert_eq!(
            config::calibrate(&mut dev, &CpuBackend, calib.iter()).unwrap(),
            2
        );
        config::calibrate_host(&mut host, &CpuBackend, calib.iter()).unwrap();
        let (qd, qh) = (config::qparams(&dev), config::qparams(&host));
        assert!(!qd.is_empty());
        assert_eq!(qd, qh);
        // The whole fake-quant state (statistics, switches, spec) is the host path's.
        assert_eq!(format!("{dev:?}"), format!("{host:?}"));
        // The simulated forward on the device equals the host module tree's.
        let want = host.forward(&CpuBackend, &x).unwrap();
        assert_eq!(chain_out(&CpuBackend, &dev, &x), want);
        // And with fake quantization off: the fused float model.
        config::set_fake_quant_enabled(&mut dev, false);
        config::set_fake_quant_enabled(&mut host, false);
        assert_eq!(
            chain_out(&CpuBackend, &dev, &x),
            host.forward(&CpuBackend, &x).unwrap()
        );
    }
}

fn spec(scheme: QScheme, axis: isize) -> ObserverSpec {
    ObserverSpec::new(QDtype::QInt8, scheme, QuantRange::INT8, axis).unwrap()
}

/// `observe_running` on the GPU gives the CPU reference's statistics and qparams, bit for
/// bit for running min/max, and refuses what the CPU refuses with the same message.
fn gpu_observer_steps_match_the_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx);
    let xs: Vec<ArrayD<f32>> = (0..3)
        .map(|i| batch(2, 10 + i).mapv(|v| v * (1.0 + i as f32) - 0.3))
        .collect();
    for (s, avg) in [
        (spec(QScheme::PerTensorAffine, 0), None),
        (spec(QScheme::PerChannelSymmetric, -1), None),
        (spec(QScheme::PerChannelAffine, 2), Some(0.25f32)),
        (spec(QScheme::PerTensorSymmetric, 0), Some(0.01)),
    ] {
        let mut cs: Option<ArrayD<f32>> = None;
        let mut gs = None;
        for x in &xs {
            let (c, cq) = CpuBackend.observe_running(cs.take(), x, &s, avg).unwrap();
            let gx = gpu.upload(x).unwrap();
            let (g, gq) = gpu.observe_running(gs.take(), &gx, &s, avg).unwrap();
            let (gh, gqh) = (
                gpu.download(&g).unwrap(),
                gpu.download_qparams(&gq).unwrap(),
            );
            if avg.is_none() {
                assert_eq!(gh, c, "{s:?}");
                assert_eq!(gqh, cq, "{s:?}");
            } else {
                // The moving average: old + c·(cur − old), which a driver may contract.
                for (a, b) in gh.iter().zip(&c) {
                    assert!(
                        (a - b).abs() <= 1e-6 * b.abs().max(1.0),
                        "{s:?}: {a} vs {b}"
                    );
                }
                for (a, b) in gqh.scale.iter().zip(&cq.scale) {
                    assert!((a - b).abs() <= 1e-5 * b.abs(), "{s:?}: {a} vs {b}");
                }
            }
            cs = Some(c);
            gs = Some(g);
        }
    }
    // The same refusals, with the same messages.
    let s = spec(QScheme::PerChannelAffine, 1);
    let x = batch(2, 1);
    let (c_state, _) = CpuBackend.observe_running(None, &x, &s, None).unwrap();
    let gx = gpu.upload(&x).unwrap();
    let (g_state, _) = gpu.observe_running(None, &gx, &s, None).unwrap();
    // Channels along axis 2 (28) against a state of axis 1's (1).
    let s2 = spec(QScheme::PerChannelAffine, 2);
    let ce = CpuBackend
        .observe_running(Some(c_state), &x, &s2, None)
        .unwrap_err();
    let ge = gpu
        .observe_running(Some(g_state), &gx, &s2, None)
        .unwrap_err();
    assert!(matches!(ce, Error::ShapeMismatch { .. }), "{ce}");
    assert_eq!(ce.to_string(), ge.to_string());
    let empty = ArrayD::<f32>::zeros(vec![0, 3]);
    let ce = CpuBackend
        .observe_running(None, &empty, &s, None)
        .unwrap_err();
    let ge = gpu
        .observe_running(None, &gpu.upload(&empty).unwrap(), &s, None)
        .unwrap_err();
    assert_eq!(ce.to_string(), ge.to_string());
    let ce = CpuBackend
        .observe_running(None, &x, &spec(QScheme::PerChannelAffine, 4), None)
        .unwrap_err();
    assert!(matches!(ce, Error::AxisOutOfRange { .. }), "{ce}");
}

/// On the GPU, calibration uploads the parameters once and each batch once and downloads
/// only the observers' statistics at the end; a calibrated simulation's forward is one
/// upload and one download; the qparams are the CPU reference's where the observed values
/// are the same.
fn gpu_ptq_simulation_stays_on_the_device() {
    if common::gpu().is_none() {
        return;
    }
    // A context of its own: the shared one counts the transfers of tests running beside.
    let ctx = std::sync::Arc::new(qfuse::gpu::GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    let calib = [batch(4, 2), batch(4, 3), batch(4, 5)];
    let mut m = model();
    config::apply(&mut m, &mnist::nni_example_config(), QuantMode::Ptq).unwrap();
    let mut cpu_m = m.clone();
    let params = m.state_dict().unwrap().tensors.len();
    let before = ctx.transfer_stats();
    config::calibrate(&mut m, &gpu, calib.iter()).unwrap();
    let d = ctx.transfer_stats().since(&before);
    let fqs = config::qparams(&m).len();
    assert_eq!(fqs, 3);
    // Two downloads per fake quant (statistics and qparams), nothing per batch.
    assert_eq!(d.downloads, 2 * fqs as u64, "{d:?}");
    assert!(
        d.uploads >= calib.len() as u64 && d.uploads <= (params + calib.len()) as u64,
        "{d:?} with {params} state-dict tensors"
    );
    config::calibrate(&mut cpu_m, &CpuBackend, calib.iter()).unwrap();
    let (qg, qc) = (config::qparams(&m), config::qparams(&cpu_m));
    // conv1's input (the batch) and weight: observed on identical values.
    assert_eq!(qg[0], qc[0]);
    assert_eq!(qg[1], qc[1]);
    let (a, b) = (&qg[2].2.scale[0], &qc[2].2.scale[0]);
    assert!(
        (a - b).abs() <= 1e-4 * b.abs(),
        "conv1._output_: {a} vs {b}"
    );

    let chain = mnist::device_forward(&m, gpu.clone()).unwrap();
    let x = batch(6, 9);
    let before = ctx.transfer_stats();
    let y = gpu
        .download(&chain.forward(&gpu.upload(&x).unwrap()).unwrap())
        .unwrap();
    let d = ctx.transfer_stats().since(&before);
    assert_eq!((d.uploads, d.downloads), (1, 1), "{d:?}");
    let want = m.clone().forward(&CpuBackend, &x).unwrap();
    let diff = y
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 0.05, "gpu simulation vs host: {diff}");
}

fn what_a_device_simulation_refuses() {
    // A fake quant that is on but never observed: the target is named.
    let mut m = model();
    config::apply(&mut m, &mnist::nni_example_config(), QuantMode::Ptq).unwrap();
    config::set_observer_enabled(&mut m, false);
    let chain = mnist::device_forward(&m, CpuBackend).unwrap();
    let e = chain
        .forward(&CpuBackend.upload(&batch(1, 0)).unwrap())
        .unwrap_err();
    assert!(e.to_string().contains("`conv1._input_`"), "{e}");
    assert!(e.to_string().contains("calibrate first"), "{e}");
    // BatchNorm in training mode: the chain is the eval forward.
    let mut t = model();
    t.train(true);
    let e = DeviceChain::from_module(&t, CpuBackend).unwrap_err();
    assert!(e.to_string().contains("training mode"), "{e}");
    // A custom forward closure runs on host arrays only.
    let c = Container::new("Odd")
        .with_child("a", Module::relu())
        .unwrap()
        .with_forward([["a"]], |s, x| s.call("a", x))
        .unwrap();
    let e = DeviceChain::from_module(&Module::container(c), CpuBackend).unwrap_err();
    assert!(e.to_string().contains("with_steps"), "{e}");
    // Calibration of such a model says so; the host path takes it.
    let cfg =
        ConfigList::from_json(r#"[{"op_names": ["a"], "target_names": ["_output_"]}]"#).unwrap();
    let c = Container::new("Odd")
        .with_child("a", Module::relu())
        .unwrap()
        .with_forward([["a"]], |s, x| s.call("a", x))
        .unwrap();
    let mut odd = Module::container(c);
    config::apply(&mut odd, &cfg, QuantMode::Ptq).unwrap();
    let x = batch(1, 1);
    assert!(config::calibrate(&mut odd, &CpuBackend, [&x]).is_err());
    assert_eq!(
        config::calibrate_host(&mut odd, &CpuBackend, [&x]).unwrap(),
        1
    );
}

/// A sequential tree with a nested container: every conv, transposed conv and linear target
/// (bias included, per channel: axis 1 for the transposed conv's weight) and the nested
/// container's own input and output targets, calibrated on the device, equal the host path
/// on the CPU bit for bit, and run on the GPU within float tolerance.
fn nested_sequential_trees_run_on_the_device() {
    use ndarray::{Array1, Array2, Array4};
    use qfuse::ops::{Conv2dParams, ConvTranspose2dParams};
    let w = |shape: [usize; 4], k: f32| {
        Array4::from_shape_fn(shape, |(a, b, c, d)| {
            ((a * 7 + b * 5 + c * 3 + d) % 11) as f32 * k - 0.2
        })
    };
    let tree = || {
        let mut m = Module::sequential([
            Module::conv2d(
                w([4, 2, 3, 3], 0.05),
                Some(Array1::from(vec![0.1, -0.1, 0.0, 0.2])),
                Conv2dParams {
                    padding: [1, 1],
                    ..Default::default()
                },
            )
            .unwrap(),
            Module::relu(),
            Module::sequential([
                Module::conv_transpose2d(
                    w([4, 3, 2, 2], 0.04),
                    Some(Array1::from(vec![0.05, 0.0, -0.05])),
                    ConvTranspose2dParams {
                        stride: [2, 2],
                        ..Default::default()
                    },
                )
                .unwrap(),
                Module::relu6(),
            ]),
            Module::flatten(1, -1),
            Module::linear(
                Array2::from_shape_fn((5, 3 * 12 * 12), |(i, j)| {
                    ((i * 13 + j) % 17) as f32 * 0.002 - 0.015
                }),
                Some(Array1::zeros(5)),
            )
            .unwrap(),
        ]);
        m.eval();
        let cfg = ConfigList::from_json(
            r#"[{"op_types": ["Conv2d", "ConvTranspose2d", "Linear"], "granularity": "per_channel"},
                {"op_names": ["2"], "target_names": ["_input_", "_output_"], "quant_dtype": "uint8"}]"#,
        )
        .unwrap();
        config::apply(&mut m, &cfg, QuantMode::Ptq).unwrap();
        m
    };
    let x = |seed: u64| {
        ArrayD::from_shape_fn(vec![2, 2, 6, 6], |d| {
            ((d[0] * 31 + d[1] * 17 + d[2] * 5 + d[3] + seed as usize) % 13) as f32 * 0.3 - 1.5
        })
    };
    let calib = [x(1), x(2)];
    let mut dev = tree();
    let mut host = tree();
    config::calibrate(&mut dev, &CpuBackend, calib.iter()).unwrap();
    config::calibrate_host(&mut host, &CpuBackend, calib.iter()).unwrap();
    let q = config::qparams(&dev);
    // conv and linear: input, weight, bias, output; the container: input, output.
    assert_eq!(q.len(), 14, "{q:?}");
    assert_eq!(q, config::qparams(&host));
    assert_eq!(format!("{dev:?}"), format!("{host:?}"));
    let ct = dev.get("2.0").unwrap().quant_targets().unwrap();
    assert_eq!(ct.weight.as_ref().unwrap().qparams().unwrap().axis, Some(1));
    let chain = DeviceChain::from_module(&dev, CpuBackend).unwrap();
    let got = CpuBackend
        .download(&chain.forward(&CpuBackend.upload(&x(3)).unwrap()).unwrap())
        .unwrap();
    assert_eq!(got, host.forward(&CpuBackend, &x(3)).unwrap());

    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx);
    let mut g = tree();
    config::calibrate(&mut g, &gpu, calib.iter()).unwrap();
    let qg = config::qparams(&g);
    assert_eq!(qg.len(), q.len());
    for ((p, t, a), (_, _, b)) in q.iter().zip(&qg) {
        for (x, y) in a.scale.iter().zip(&b.scale) {
            assert!((x - y).abs() <= 1e-4 * x.abs(), "{p}.{t}: {x} vs {y}");
        }
    }
    let chain = DeviceChain::from_module(&g, gpu.clone()).unwrap();
    let y = gpu
        .download(&chain.forward(&gpu.upload(&x(3)).unwrap()).unwrap())
        .unwrap();
    let d = y
        .iter()
        .zip(&got)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(d < 0.05, "gpu vs cpu: {d}");
}

/// NNI's Mnist after QAT preparation (`ConvBnReLU62d`, `ConvReLU62d`, `LinearReLU6`, `Linear`
/// QAT modules, per-channel symmetric weights, input targets), one γ = 0 channel, in eval.
fn qat_model() -> Module {
    let mut m = model();
    if let qfuse::nn::Layer::BatchNorm2d(b) = m.get_mut("batchnorm1").unwrap().layer_mut() {
        b.bn.weight.as_mut().unwrap()[3] = 0.0;
    }
    let cfg = ConfigList::from_json(
        r#"[{"op_types": ["Conv2d", "Linear"], "granularity": "per_channel",
             "quant_scheme": "symmetric",
             "fuse_names": [["conv1", "batchnorm1", "relu1"], ["conv2", "relu2"], ["fc1", "relu3"]]}]"#,
    )
    .unwrap();
    config::apply(&mut m, &cfg, QuantMode::Qat).unwrap();
    m.eval();
    m
}

/// QAT module trees calibrate on the device: on the CPU backend the observers, qparams and
/// the simulated forward equal the host path bit for bit (the γ = 0 channel included); on the
/// GPU a batch costs one upload and no download, the statistics come down once at the end,
/// and the qparams are the CPU's (weights bit for bit, activations within float tolerance).
fn qat_trees_calibrate_on_the_device() {
    let calib = [batch(3, 2), batch(3, 3)];
    let x = batch(4, 4);
    let mut dev = qat_model();
    assert_eq!(dev.get("conv1").unwrap().kind_name(), "ConvBnReLU62d");
    let mut host = dev.clone();
    assert_eq!(
        config::calibrate(&mut dev, &CpuBackend, calib.iter()).unwrap(),
        2
    );
    config::calibrate_host(&mut host, &CpuBackend, calib.iter()).unwrap();
    let q = config::qparams(&dev);
    // Four modules: input, weight, output each.
    assert_eq!(q.len(), 12, "{q:?}");
    assert_eq!(q, config::qparams(&host));
    assert_eq!(format!("{dev:?}"), format!("{host:?}"));
    let want = host.forward(&CpuBackend, &x).unwrap();
    assert_eq!(chain_out(&CpuBackend, &dev, &x), want);
    let mut dev_off = dev.clone();
    config::set_fake_quant_enabled(&mut dev_off, false);
    config::set_fake_quant_enabled(&mut host, false);
    assert_eq!(
        chain_out(&CpuBackend, &dev_off, &x),
        host.forward(&CpuBackend, &x).unwrap()
    );
    // A QAT conv + BatchNorm in training mode is not an eval forward.
    let mut t = dev.clone();
    t.train(true);
    let e = DeviceChain::from_module(&t, CpuBackend).unwrap_err();
    assert!(e.to_string().contains("training mode"), "{e}");

    if common::gpu().is_none() {
        return;
    }
    let ctx = std::sync::Arc::new(qfuse::gpu::GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    let mut per_batches = Vec::new();
    for n in [1usize, 3] {
        let mut g = qat_model();
        let batches: Vec<ArrayD<f32>> = (0..n as u64).map(|i| batch(3, 2 + i)).collect();
        let before = ctx.transfer_stats();
        config::calibrate(&mut g, &gpu, batches.iter()).unwrap();
        let d = ctx.transfer_stats().since(&before);
        // Statistics and qparams of each fake quant, once; nothing per batch.
        assert_eq!(d.downloads, 2 * q.len() as u64, "{d:?}");
        per_batches.push(d.uploads);
        if n == 1 {
            let mut c = qat_model();
            config::calibrate(&mut c, &CpuBackend, batches.iter()).unwrap();
            for ((p, t, a), (_, _, b)) in config::qparams(&g).iter().zip(&config::qparams(&c)) {
                if *t == qfuse::nn::QuantTarget::Weight {
                    assert_eq!(a, b, "{p}.{t}");
                }
                for (x, y) in a.scale.iter().zip(&b.scale) {
                    assert!((x - y).abs() <= 1e-4 * y.abs(), "{p}.{t}: {x} vs {y}");
                }
            }
        }
    }
    // One upload per batch beyond the parameters.
    assert_eq!(per_batches[1] - per_batches[0], 2, "{per_batches:?}");
    let chain = DeviceChain::from_module(&dev, gpu.clone()).unwrap();
    let before = ctx.transfer_stats();
    let y = gpu
        .download(&chain.forward(&gpu.upload(&x).unwrap()).unwrap())
        .unwrap();
    let d = ctx.transfer_stats().since(&before);
    assert_eq!((d.uploads, d.downloads), (1, 1), "{d:?}");
    let diff = y
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 0.05, "gpu QAT simulation vs host: {diff}");
}

/// A residual block declared with `ForwardStep::Add` and a second branch
/// (`ForwardStep::Branch`: a 1×1 shortcut conv from the block's input), with targets on every
/// conv and on the block's output: calibrated on the device it equals the host path bit for
/// bit on the CPU; on the GPU calibration uploads each batch once and downloads only the
/// statistics, and a forward is one upload and one download.
fn residual_trees_run_on_the_device() {
    use qfuse::nn::ForwardStep;
    let tree = || {
        let block = qfuse::model::resnet::basic_block_module(4, 3).unwrap();
        let qfuse::nn::Layer::Container(c) = block.layer() else {
            unreachable!()
        };
        let mut c = c.clone();
        let w = ndarray::Array4::from_shape_fn((4, 4, 1, 1), |(o, i, _, _)| {
            ((o * 5 + i * 3) % 7) as f32 * 0.1 - 0.3
        });
        c.push(
            "shortcut",
            Module::conv2d(w, None, Default::default()).unwrap(),
        )
        .unwrap();
        let c = c
            .with_steps([
                ForwardStep::child("conv1"),
                ForwardStep::child("bn1"),
                ForwardStep::op(Module::relu()),
                ForwardStep::child("conv2"),
                ForwardStep::child("bn2"),
                ForwardStep::Branch(0),
                ForwardStep::child("shortcut"),
                ForwardStep::Add(5),
                ForwardStep::Add(0),
                ForwardStep::op(Module::relu()),
            ])
            .unwrap();
        // The value the add reads cuts the chains (bn2's output is not fused into the next).
        assert_eq!(
            c.chains(),
            vec![vec!["conv1", "bn1"], vec!["conv2", "bn2"], vec!["shortcut"]]
        );
        let mut m = Module::container(c);
        m.eval();
        let cfg = ConfigList::from_json(
            r#"[{"op_types": ["Conv2d"], "granularity": "per_channel",
                 "fuse_names": [["conv1", "bn1"], ["conv2", "bn2"]]},
                {"op_names": [""], "target_names": ["_output_"], "quant_dtype": "uint8"}]"#,
        )
        .unwrap();
        config::apply(&mut m, &cfg, QuantMode::Ptq).unwrap();
        m
    };
    let x = |n: usize, seed: u64| qfuse::model::resnet::synthetic_input(n, 4, 6, seed).into_dyn();
    let calib = [x(2, 1), x(2, 2)];
    let (mut dev, mut host) = (tree(), tree());
    config::calibrate(&mut dev, &CpuBackend, calib.iter()).unwrap();
    config::calibrate_host(&mut host, &CpuBackend, calib.iter()).unwrap();
    let q = config::qparams(&dev);
    // Two convs with input, weight, bias, output; the shortcut (no bias): input, weight,
    // output; the block's output.
    assert_eq!(q.len(), 12, "{q:?}");
    assert_eq!(q, config::qparams(&host));
    assert_eq!(format!("{dev:?}"), format!("{host:?}"));
    let want = host.forward(&CpuBackend, &x(3, 9)).unwrap();
    assert_eq!(chain_out(&CpuBackend, &dev, &x(3, 9)), want);
    // A wrong add (a value of another shape) is the add's shape error on both paths.
    let bad = Container::new("Bad")
        .with_child("pool", Module::max_pool2d(2, 2).unwrap())
        .unwrap()
        .with_steps([ForwardStep::child("pool"), ForwardStep::Add(0)])
        .unwrap();
    let bad = Module::container(bad);
    let he = bad.clone().forward(&CpuBackend, &x(1, 1)).unwrap_err();
    let de = DeviceChain::from_module(&bad, CpuBackend)
        .unwrap()
        .forward(&CpuBackend.upload(&x(1, 1)).unwrap())
        .unwrap_err();
    assert_eq!(he.to_string(), de.to_string());
    // A step may not read a value that is not computed yet.
    let e = Container::new("Ahead")
        .with_child("pool", Module::max_pool2d(2, 2).unwrap())
        .unwrap()
        .with_steps([ForwardStep::Add(1), ForwardStep::child("pool")])
        .unwrap_err();
    assert!(e.to_string().contains("not computed yet"), "{e}");

    if common::gpu().is_none() {
        return;
    }
    let ctx = std::sync::Arc::new(qfuse::gpu::GpuContext::new().unwrap());
    let gpu = GpuBackend::new(ctx.clone());
    let mut g = tree();
    let before = ctx.transfer_stats();
    config::calibrate(&mut g, &gpu, calib.iter()).unwrap();
    let d = ctx.transfer_stats().since(&before);
    assert_eq!(d.downloads, 2 * q.len() as u64, "{d:?}");
    let params = g.state_dict().unwrap().tensors.len() as u64;
    assert!(d.uploads >= 2 && d.uploads <= params + 2, "{d:?}");
    for ((p, t, a), (_, _, b)) in config::qparams(&g).iter().zip(&q) {
        for (x, y) in a.scale.iter().zip(&b.scale) {
            assert!((x - y).abs() <= 1e-4 * y.abs(), "{p}.{t}: {x} vs {y}");
        }
    }
    let chain = DeviceChain::from_module(&g, gpu.clone()).unwrap();
    let before = ctx.transfer_stats();
    let y = gpu
        .download(&chain.forward(&gpu.upload(&x(3, 9)).unwrap()).unwrap())
        .unwrap();
    let d = ctx.transfer_stats().since(&before);
    assert_eq!((d.uploads, d.downloads), (1, 1), "{d:?}");
    let diff = y
        .iter()
        .zip(&want)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 0.05, "gpu vs host: {diff}");
}

crate::qfuse_tests! {
    device_calibration_equals_the_host_path_on_the_cpu,
    gpu_observer_steps_match_the_cpu: gpu,
    gpu_ptq_simulation_stays_on_the_device: gpu,
    what_a_device_simulation_refuses,
    nested_sequential_trees_run_on_the_device,
    qat_trees_calibrate_on_the_device,
    residual_trees_run_on_the_device,
}
