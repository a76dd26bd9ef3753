//! NNI-style config lists applied to module trees: selection (op_names, op_types, excludes),
//! fusion, targets, dtypes and schemes, calibration over several batches, the simulated
//! forward, and the errors.

use crate::common;

use ndarray::{concatenate, Array1, Array2, ArrayD, Axis, IxDyn};
use qfuse::backend::{Backend, CpuBackend, GpuBackend, HostOps};
use qfuse::config::{self, ConfigList, QuantMode};
use qfuse::model::mnist;
use qfuse::nn::{Layer, Module, QuantTarget};
use qfuse::qat;
use qfuse::quant::{ObserverSpec, QDtype, QParams, QScheme, QuantRange};
use qfuse::reference::fake_quant::fake_quantize;
use qfuse::reference::observer::{calculate_qparams, min_max, min_max_per_channel};
use qfuse::Error;

fn cfg(json: &str) -> ConfigList {
    ConfigList::from_json(json).unwrap_or_else(|e| panic!("{json}: {e}"))
}

fn model() -> Module {
    let mut m = mnist::mnist(11).unwrap();
    m.eval();
    m
}

fn batch(n: usize, seed: u64) -> ArrayD<f32> {
    mnist::synthetic_batch(n, seed).into_dyn()
}

fn targets(applied: &config::AppliedConfig) -> Vec<(&str, Vec<&str>)> {
    applied
        .quantized
        .iter()
        .map(|(p, ts)| (p.as_str(), ts.iter().map(|t| t.name()).collect()))
        .collect()
}

fn qp_of(m: &Module, path: &str, t: QuantTarget) -> QParams {
    m.get(path)
        .unwrap()
        .quant_targets()
        .and_then(|q| q.get(t))
        .and_then(|fq| fq.qparams().ok())
        .unwrap_or_else(|| panic!("no qparams for {path}.{t}"))
}

fn max_diff(a: &ArrayD<f32>, b: &ArrayD<f32>) -> f32 {
    assert_eq!(a.shape(), b.shape());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

fn op_types_select_every_module_of_the_type() {
    let mut m = model();
    let c = cfg(r#"[{"op_types": ["Conv2d"], "target_names": ["_input_", "weight", "_output_"]}]"#);
    let applied = config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    assert!(applied.fused.is_empty());
    assert_eq!(
        targets(&applied),
        [
            ("conv1", vec!["_input_", "weight", "_output_"]),
            ("conv2", vec!["_input_", "weight", "_output_"])
        ]
    );
    assert!(m.get("fc1").unwrap().quant_targets().is_none());
    config::calibrate(&mut m, &CpuBackend, [&batch(4, 1)]).unwrap();
    let names: Vec<String> = config::qparams(&m)
        .iter()
        .map(|(p, t, _)| format!("{p}.{t}"))
        .collect();
    assert_eq!(
        names,
        [
            "conv1._input_",
            "conv1.weight",
            "conv1._output_",
            "conv2._input_",
            "conv2.weight",
            "conv2._output_"
        ]
    );
}

fn selection_happens_before_fusion() {
    // conv2 + relu2 fuse into a ConvReLU62d, still selected by op_types Conv2d; its output
    // target comes after the activation.
    let mut m = model();
    let c = cfg(
        r#"[{"op_types": ["Conv2d"], "target_names": ["_output_"], "fuse_names": [["conv2", "relu2"]]}]"#,
    );
    let applied = config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    assert_eq!(applied.fused, vec![vec!["conv2", "relu2"]]);
    assert_eq!(m.get("conv2").unwrap().kind_name(), "ConvReLU62d");
    assert_eq!(m.get("relu2").unwrap().kind_name(), "Identity");
    assert_eq!(
        targets(&applied),
        [("conv1", vec!["_output_"]), ("conv2", vec!["_output_"])]
    );
    config::calibrate(&mut m, &CpuBackend, [&batch(4, 2)]).unwrap();
    let out = m
        .get("conv2")
        .unwrap()
        .quant_targets()
        .unwrap()
        .output
        .clone()
        .unwrap();
    assert!(out.min_val[0] >= 0.0 && out.max_val[0] <= 6.0);
}

fn exclude_op_names_and_default_targets() {
    let mut m = model();
    let c = cfg(r#"[{"op_types": ["Conv2d", "Linear"], "exclude_op_names": ["fc2"]}]"#);
    let applied = config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    let all = vec!["_input_", "weight", "bias", "_output_"];
    assert_eq!(
        targets(&applied),
        [
            ("conv1", all.clone()),
            ("conv2", all.clone()),
            ("fc1", all.clone())
        ]
    );
    // Both op_names and op_types: both must hold (NNI); default targets on a ReLU6 are its
    // input and output only.
    let mut m = model();
    let c =
        cfg(r#"[{"op_names": ["fc1", "relu3"], "op_types": ["Linear"]}, {"op_names": ["relu3"]}]"#);
    let applied = config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    assert_eq!(
        targets(&applied),
        [("fc1", all.clone()), ("relu3", vec!["_input_", "_output_"])]
    );
    let mut m = model();
    let c = cfg(r#"[{"op_names": ["conv1", "relu1"], "exclude_op_types": ["ReLU6"]}]"#);
    let applied = config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    assert_eq!(targets(&applied), [("conv1", all)]);
}

fn later_entries_override_per_target() {
    let mut m = model();
    let c = cfg(
        r#"[{"op_names": ["fc1"], "target_names": ["_input_", "weight"], "quant_dtype": "int8"},
            {"op_names": ["fc1"], "target_names": ["weight"], "quant_dtype": "int4", "quant_scheme": "symmetric"}]"#,
    );
    config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    let q = m.get("fc1").unwrap().quant_targets().unwrap();
    assert_eq!(q.input.as_ref().unwrap().spec.range, QuantRange::INT8);
    let w = q.weight.as_ref().unwrap().spec;
    assert_eq!(w.range, QuantRange::INT4);
    assert_eq!(w.qscheme, QScheme::PerTensorSymmetric);
}

fn per_channel_weight() {
    let mut m = model();
    let c = cfg(
        r#"[{"op_names": ["conv1", "fc1"], "target_names": ["weight", "_output_"], "granularity": "per_channel",
            "fuse_names": [["conv1", "batchnorm1"]]}]"#,
    );
    config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    config::calibrate(&mut m, &CpuBackend, [&batch(2, 3)]).unwrap();
    for (path, channels) in [("conv1", 20), ("fc1", 500)] {
        let qp = qp_of(&m, path, QuantTarget::Weight);
        assert_eq!(qp.axis, Some(0));
        assert_eq!(qp.channels(), channels);
        // The folded (conv1) / plain (fc1) weight's per-output-channel min/max.
        let w = match m.get(path).unwrap().layer() {
            Layer::Conv2d(c) => c.weight.clone(),
            Layer::Linear(l) => l.weight.clone().into_dyn(),
            other => panic!("{other:?}"),
        };
        let spec = ObserverSpec::new(
            QDtype::QInt8,
            QScheme::PerChannelAffine,
            QuantRange::INT8,
            0,
        )
        .unwrap();
        let (mn, mx) = min_max_per_channel(&w, 0).unwrap();
        assert_eq!(qp, calculate_qparams(&mn, &mx, &spec));
        // Activations stay per tensor.
        assert_eq!(qp_of(&m, path, QuantTarget::Output).axis, None);
    }
}

fn uint8_symmetric_and_int4() {
    let mut m = model();
    let c = cfg(
        r#"[{"op_names": ["conv1"], "target_names": ["_input_"], "quant_dtype": "uint8", "quant_scheme": "symmetric"},
            {"op_names": ["fc2"], "target_names": ["_input_", "_output_"], "quant_dtype": "int4"}]"#,
    );
    config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    let x = batch(6, 4);
    config::calibrate(&mut m, &CpuBackend, [&x]).unwrap();
    let qp = qp_of(&m, "conv1", QuantTarget::Input);
    let (mn, mx) = min_max(&x);
    let amax = mn.abs().max(mx);
    assert_eq!(qp.zero_point, vec![128]);
    assert_eq!(qp.scale, vec![amax / 127.5]);

    // int4: fc2's input takes at most 16 values.
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::<f32>::new()));
    let sink = seen.clone();
    m.get_mut("relu3")
        .unwrap()
        .register_forward_hook(move |_, _, y| {
            sink.lock().unwrap().extend(y.iter().copied());
            None
        });
    m.forward(&CpuBackend, &x).unwrap();
    let qp = qp_of(&m, "fc2", QuantTarget::Input);
    assert!((-8..=7).contains(&qp.zero_point[0]));
    let values = seen.lock().unwrap().clone();
    let values = ArrayD::from_shape_vec(IxDyn(&[values.len()]), values).unwrap();
    let q_in = fake_quantize(&values, &qp, QuantRange::INT4).unwrap();
    let mut levels: Vec<f32> = q_in.iter().copied().collect();
    levels.sort_by(f32::total_cmp);
    levels.dedup();
    assert!(levels.len() <= 16, "{} levels", levels.len());
    let out = qp_of(&m, "fc2", QuantTarget::Output);
    assert!((-8..=7).contains(&out.zero_point[0]));
}

fn simulated_forward_is_fq_output_of_op_on_fq_input_and_fq_weight() {
    let w = Array2::from_shape_fn((3, 4), |(i, j)| (i as f32 - 1.0) * 0.3 + j as f32 * 0.07);
    let b = Array1::from(vec![0.1f32, -0.2, 0.05]);
    let mut m = Module::sequential([Module::linear(w.clone(), Some(b.clone())).unwrap()]);
    let c = cfg(
        r#"[{"op_names": ["0"], "target_names": ["_input_", "weight", "bias", "_output_"], "quant_dtype": "uint8"}]"#,
    );
    config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    let x = ArrayD::from_shape_fn(IxDyn(&[5, 4]), |d| (d[0] as f32 * 0.7 - d[1] as f32).sin());
    config::calibrate(&mut m, &CpuBackend, [&x]).unwrap();
    let y = m.forward(&CpuBackend, &x).unwrap();

    let spec = ObserverSpec::new(
        QDtype::QUInt8,
        QScheme::PerTensorAffine,
        QuantRange::UINT8,
        0,
    )
    .unwrap();
    let fq = |a: &ArrayD<f32>| {
        let (mn, mx) = min_max(a);
        let qp = calculate_qparams(&[mn], &[mx], &spec);
        (fake_quantize(a, &qp, QuantRange::UINT8).unwrap(), qp)
    };
    let (xq, qx) = fq(&x);
    let (wq, qw) = fq(&w.clone().into_dyn());
    let (bq, qb) = fq(&b.clone().into_dyn());
    let x2 = xq.into_dimensionality().unwrap();
    let w2 = wq.into_dimensionality().unwrap();
    let b1 = bq.into_dimensionality().unwrap();
    let y0 = CpuBackend.linear(&x2, &w2, Some(&b1)).unwrap().into_dyn();
    let (want, qy) = fq(&y0);
    assert_eq!(y, want);
    let got: Vec<QParams> = config::qparams(&m).into_iter().map(|(_, _, q)| q).collect();
    assert_eq!(got, [qx, qw, qb, qy]);
    // The layer keeps its float parameters.
    match m.get("0").unwrap().layer() {
        Layer::Linear(l) => assert_eq!((&l.weight, l.bias.as_ref()), (&w, Some(&b))),
        other => panic!("{other:?}"),
    }
    // Fake quant off: the float model.
    config::set_fake_quant_enabled(&mut m, false);
    let y_float = m.forward(&CpuBackend, &x).unwrap();
    let want_float = CpuBackend
        .linear(&x.clone().into_dimensionality().unwrap(), &w, Some(&b))
        .unwrap()
        .into_dyn();
    assert_eq!(y_float, want_float);
}

fn calibration_over_two_batches_is_min_max_over_both() {
    let c = mnist::nni_example_config();
    // Two batches with different ranges: the union's min from the first, max from the second.
    let (a, b) = (batch(4, 21) - 0.5, batch(3, 22) * 1.3);
    let mut m = model();
    config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    assert_eq!(config::calibrate(&mut m, &CpuBackend, [&a, &b]).unwrap(), 2);
    let fq = m
        .get("conv1")
        .unwrap()
        .quant_targets()
        .unwrap()
        .input
        .clone()
        .unwrap();
    let both = concatenate(Axis(0), &[a.view(), b.view()]).unwrap();
    let (mn, mx) = min_max(&both);
    assert_eq!(
        (fq.min_val.as_slice(), fq.max_val.as_slice()),
        (&[mn][..], &[mx][..])
    );
    let spec =
        ObserverSpec::new(QDtype::QInt8, QScheme::PerTensorAffine, QuantRange::INT8, 0).unwrap();
    assert_eq!(
        fq.qparams().unwrap(),
        calculate_qparams(&[mn], &[mx], &spec)
    );
    // Each batch's own range is narrower than the union (else the test proves nothing).
    assert!(min_max(&a).0 == mn && min_max(&a).1 < mx);
    assert!(min_max(&b).0 > mn && min_max(&b).1 == mx);

    // The output observer saw both batches' outputs: its range covers a one-batch run's.
    let out = m
        .get("conv1")
        .unwrap()
        .quant_targets()
        .unwrap()
        .output
        .clone()
        .unwrap();
    let mut one = model();
    config::apply(&mut one, &c, QuantMode::Ptq).unwrap();
    config::calibrate(&mut one, &CpuBackend, [&a]).unwrap();
    let out_a = one
        .get("conv1")
        .unwrap()
        .quant_targets()
        .unwrap()
        .output
        .clone()
        .unwrap();
    assert!(out.min_val[0] <= out_a.min_val[0] && out.max_val[0] >= out_a.max_val[0]);

    // After calibration the observers are off: more forwards change nothing.
    let before = config::qparams(&m);
    m.forward(&CpuBackend, &batch(2, 99).mapv(|v| v * 3.0))
        .unwrap();
    assert_eq!(config::qparams(&m), before);
    // Calibrating again accumulates; after a reset it starts afresh.
    config::reset_observers(&mut m);
    assert!(config::qparams(&m).is_empty());
    config::calibrate(&mut m, &CpuBackend, [&a]).unwrap();
    assert_eq!(config::qparams(&m), config::qparams(&one));
}

fn errors_name_what_is_wrong() {
    let e = |json: &str| {
        let mut m = mnist::mnist(11).unwrap();
        let before = format!(
            "{:?}",
            m.named_modules()
                .iter()
                .map(|(p, m)| (p.clone(), m.kind_name()))
                .collect::<Vec<_>>()
        );
        let err = config::apply(&mut m, &cfg(json), QuantMode::Ptq).unwrap_err();
        // Nothing changed.
        let after = format!(
            "{:?}",
            m.named_modules()
                .iter()
                .map(|(p, m)| (p.clone(), m.kind_name()))
                .collect::<Vec<_>>()
        );
        assert_eq!(before, after);
        assert!(m.get("conv1").unwrap().quant_targets().is_none());
        assert!(
            m.is_training(),
            "apply must not even change the training flags on error"
        );
        err
    };
    // Unknown op names: the closest paths.
    let err = e(r#"[{"op_names": ["conv3"]}]"#);
    assert!(matches!(err, Error::UnknownModule { .. }), "{err}");
    let msg = err.to_string();
    assert!(
        msg.contains("conv3") && msg.contains("`conv1`") && msg.contains("`conv2`"),
        "{msg}"
    );
    assert!(msg.contains("config_list[0].op_names"), "{msg}");
    let msg = e(r#"[{"op_types": ["Linear"], "exclude_op_names": ["fc_2"]}]"#).to_string();
    assert!(
        msg.contains("`fc2`") && msg.contains("exclude_op_names"),
        "{msg}"
    );
    let msg = e(r#"[{"op_names": ["conv1"], "fuse_names": [["conv1", "batchnorm"]]}]"#).to_string();
    assert!(msg.contains("`batchnorm1`"), "{msg}");
    // Selects nothing: the model's types.
    let msg = e(r#"[{"op_types": ["conv2d"]}]"#).to_string();
    assert!(
        msg.contains("selects no module") && msg.contains("Conv2d"),
        "{msg}"
    );
    // A weight on a module without one.
    let msg = e(r#"[{"op_names": ["relu1"], "target_names": ["weight"]}]"#).to_string();
    assert!(
        msg.contains("`relu1`") && msg.contains("ReLU6") && msg.contains("no weight"),
        "{msg}"
    );
    // NNI's fusion rules.
    let msg =
        e(r#"[{"op_names": ["conv2"], "fuse_names": [["conv1", "batchnorm1"]]}]"#).to_string();
    assert!(
        msg.contains("`conv1`") && msg.contains("does not select"),
        "{msg}"
    );
    let msg = e(
        r#"[{"op_names": ["conv1"], "fuse_names": [["conv1", "batchnorm1"]]}, {"op_names": ["batchnorm1"]}]"#,
    )
    .to_string();
    assert!(
        msg.contains("`batchnorm1`") && msg.contains("Identity"),
        "{msg}"
    );
    // Fusion's own errors come through.
    let msg = e(r#"[{"op_names": ["conv1"], "fuse_names": [["conv1", "max_pool1"]]}]"#).to_string();
    assert!(msg.contains("did not find fuser method"), "{msg}");
    // QAT modules do not quantize their bias.
    let mut m = model();
    let c = cfg(r#"[{"op_names": ["fc1"], "target_names": ["weight", "bias"]}]"#);
    let err = config::apply(&mut m, &c, QuantMode::Qat).unwrap_err();
    assert!(err.to_string().contains("bias of `fc1`"), "{err}");
    assert_eq!(m.get("fc1").unwrap().kind_name(), "Linear");

    // Bad keys and values at parse time name them.
    for (json, what) in [
        (
            r#"[{"op_names": ["conv1"], "quant_bits": 8}]"#,
            "quant_bits",
        ),
        (
            r#"[{"op_names": ["conv1"], "quant_dtype": "int7"}]"#,
            "int7",
        ),
        (
            r#"[{"op_names": ["conv1"], "quant_scheme": "asymmetric"}]"#,
            "asymmetric",
        ),
        (
            r#"[{"op_names": ["conv1"], "granularity": "per_token"}]"#,
            "per_token",
        ),
        (
            r#"[{"op_names": ["conv1"], "target_names": ["input"]}]"#,
            "input",
        ),
        (r#"[{"op_names": "conv1"}]"#, "op_names"),
    ] {
        let msg = ConfigList::from_json(json).unwrap_err().to_string();
        assert!(msg.contains(what), "{json}: {msg}");
    }

    // Calibrating a model without targets, or on no batches.
    let mut m = model();
    let err = config::calibrate(&mut m, &CpuBackend, []).unwrap_err();
    assert!(err.to_string().contains("apply a config first"), "{err}");
    config::apply(&mut m, &mnist::nni_example_config(), QuantMode::Ptq).unwrap();
    let err = config::calibrate(&mut m, &CpuBackend, []).unwrap_err();
    assert!(err.to_string().contains("at least one batch"), "{err}");
    // A forward before calibration has no qparams to use.
    config::set_observer_enabled(&mut m, false);
    let err = m.forward(&CpuBackend, &batch(1, 0)).unwrap_err();
    assert!(err.to_string().contains("conv1._input_"), "{err}");
}

/// Calibrates (on the device: observers on `b`) and runs the simulation of a per-channel
/// config on `b`: the output and the qparams.
fn calibrated_on<B: Backend>(b: &B) -> (ArrayD<f32>, Vec<(String, QuantTarget, QParams)>) {
    let mut m = model();
    let c = cfg(
        r#"[{"op_types": ["Conv2d", "Linear"], "target_names": ["_input_", "weight", "_output_"],
            "fuse_names": [["conv1", "batchnorm1", "relu1"]], "granularity": "per_channel"}]"#,
    );
    config::apply(&mut m, &c, QuantMode::Ptq).unwrap();
    config::calibrate(&mut m, b, [&batch(4, 5), &batch(4, 6)]).unwrap();
    let chain = mnist::device_forward(&m, b.clone()).unwrap();
    let y = b
        .download(&chain.forward(&b.upload(&batch(4, 7)).unwrap()).unwrap())
        .unwrap();
    (y, config::qparams(&m))
}

fn calibration_on_the_gpu_matches_the_cpu() {
    let Some(ctx) = common::gpu() else { return };
    let gpu = GpuBackend::new(ctx);
    let (y_cpu, q_cpu) = calibrated_on(&CpuBackend);
    let (y_gpu, q_gpu) = calibrated_on(&gpu);
    assert_eq!(q_cpu.len(), 12);
    assert_eq!(q_cpu.len(), q_gpu.len());
    for ((p, t, a), (p2, t2, b)) in q_cpu.iter().zip(&q_gpu) {
        assert_eq!((p, t), (p2, t2));
        if p == "conv1" && *t == QuantTarget::Input || *t == QuantTarget::Weight {
            // Observed on the same values on both (the batch, the weights): the same bits.
            assert_eq!(a, b, "{p}.{t}");
        } else {
            // Observed on op outputs, which differ in summation order between backends.
            for (x, y) in a.scale.iter().zip(&b.scale) {
                assert!((x - y).abs() <= 1e-3 * x.abs(), "{p}.{t}: {x} vs {y}");
            }
        }
    }
    // A one-step flip of a rounding is possible between backends; the outputs stay close.
    assert!(
        max_diff(&y_cpu, &y_gpu) < 0.05,
        "{}",
        max_diff(&y_cpu, &y_gpu)
    );
}

fn qat_mode_converts_to_qat_modules() {
    let mut m = mnist::mnist(11).unwrap();
    let c = cfg(
        r#"[{"op_names": ["conv1"], "target_names": ["_input_", "weight", "_output_"],
             "fuse_names": [["conv1", "batchnorm1"]]},
            {"op_types": ["Linear"], "target_names": ["weight"], "granularity": "per_channel"},
            {"op_names": ["relu3"], "target_names": ["_output_"], "quant_dtype": "uint8"}]"#,
    );
    let applied = config::apply(&mut m, &c, QuantMode::Qat).unwrap();
    assert!(m.is_training());
    assert_eq!(m.get("conv1").unwrap().kind_name(), "ConvBn2d");
    assert!(matches!(m.get("conv1").unwrap().layer(), Layer::Qat(_)));
    assert!(matches!(m.get("fc1").unwrap().layer(), Layer::Qat(_)));
    assert_eq!(m.get("batchnorm1").unwrap().kind_name(), "Identity");
    assert_eq!(m.get("relu3").unwrap().kind_name(), "ReLU6");
    assert_eq!(
        targets(&applied),
        [
            ("conv1", vec!["_input_", "weight", "_output_"]),
            ("fc1", vec!["weight"]),
            ("fc2", vec!["weight"]),
            ("relu3", vec!["_output_"])
        ]
    );
    // A training-mode forward observes every fake quant (moving averages).
    let x = batch(4, 8);
    let y = m.forward(&CpuBackend, &x).unwrap();
    assert_eq!(y.shape(), &[4, 10]);
    let q = config::qparams(&m);
    assert_eq!(q.len(), 6);
    let fc1_w = q
        .iter()
        .find(|(p, t, _)| p == "fc1" && *t == QuantTarget::Weight)
        .unwrap();
    assert_eq!(fc1_w.2.axis, Some(0));
    assert_eq!(fc1_w.2.channels(), 500);
    // The switches reach the QAT modules' fake quants too; a fresh QAT step can then train.
    assert_eq!(config::set_observer_enabled(&mut m, false), 6);
    qat::freeze_bn_stats(&mut m);
    assert_eq!(config::qparams(&m), q);
}

crate::qfuse_tests! {
    op_types_select_every_module_of_the_type,
    selection_happens_before_fusion,
    exclude_op_names_and_default_targets,
    later_entries_override_per_target,
    per_channel_weight,
    uint8_symmetric_and_int4,
    simulated_forward_is_fq_output_of_op_on_fq_input_and_fq_weight,
    calibration_over_two_batches_is_min_max_over_both,
    errors_name_what_is_wrong,
    calibration_on_the_gpu_matches_the_cpu: gpu,
    qat_mode_converts_to_qat_modules,
}
