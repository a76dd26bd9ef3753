//! Every kind of bad input the public API handles comes back as a typed `qfuse::Error` with a
//! message that names the problem — never a panic.

use ndarray::{Array1, Array2, Array4, ArrayD, IxDyn};
use qfuse::io::Case;
use qfuse::ops::{BatchNorm, Conv2d, Conv2dParams};
use qfuse::quant::{ObserverSpec, QDtype, QParams, QScheme, QuantRange};
use qfuse::{CpuBackend, Error, HostOps};

fn x() -> ArrayD<f32> {
    ArrayD::from_shape_fn(IxDyn(&[2, 3, 4]), |i| (i[0] + i[1] + i[2]) as f32 * 0.1)
}

fn bn(c: usize) -> BatchNorm {
    BatchNorm {
        weight: Some(Array1::ones(c)),
        bias: Some(Array1::zeros(c)),
        running_mean: Array1::zeros(c),
        running_var: Array1::ones(c),
        eps: 1e-5,
        momentum: 0.1,
    }
}

fn scale_not_positive_or_not_finite() {
    for s in [0.0, -0.5, f32::NAN, f32::INFINITY] {
        let e = CpuBackend
            .fake_quant(&x(), &QParams::per_tensor(s, 0), QuantRange::INT8)
            .unwrap_err();
        assert!(matches!(e, Error::InvalidScale { .. }), "{e:?}");
        assert!(
            e.to_string().contains("scale must be positive and finite"),
            "{e}"
        );
    }
}

fn quant_min_above_quant_max() {
    // PyTorch's fake quantization accepts a single-value range; observers do not.
    assert!(QuantRange::new(5, 5).is_ok());
    let e = QuantRange::new(6, 5).unwrap_err();
    assert_eq!(
        e.to_string(),
        "quant_min (6) must not be greater than quant_max (5)"
    );
    let r = QuantRange {
        quant_min: 10,
        quant_max: -10,
    };
    let e = CpuBackend
        .fake_quant(&x(), &QParams::per_tensor(0.1, 0), r)
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("quant_min (10) must not be greater than quant_max (-10)"),
        "{e}"
    );
}

fn zero_point_outside_range() {
    let e = CpuBackend
        .fake_quant(&x(), &QParams::per_tensor(0.1, 300), QuantRange::UINT8)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "zero_point 300 (channel 0) is outside [quant_min, quant_max] = [0, 255]"
    );
}

fn axis_out_of_range() {
    let qp = QParams::per_channel(vec![0.1; 3], vec![0; 3], 3).unwrap();
    let e = CpuBackend
        .fake_quant(&x(), &qp, QuantRange::INT8)
        .unwrap_err();
    assert_eq!(
        e.to_string(),
        "axis 3 is out of range for a tensor of rank 3"
    );
    let spec = ObserverSpec::new(
        QDtype::QInt8,
        QScheme::PerChannelSymmetric,
        QuantRange::INT8,
        7,
    )
    .unwrap();
    let e = CpuBackend.calc_qparams(&x(), &spec).unwrap_err();
    assert!(e.to_string().contains("axis 7 is out of range"), "{e}");
}

fn shape_mismatch_names_both_shapes() {
    let qp = QParams::per_channel(vec![0.1; 5], vec![0; 5], 1).unwrap();
    let e = CpuBackend
        .fake_quant(&x(), &qp, QuantRange::INT8)
        .unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("expected [3], got [5]"), "{msg}");
    let dy = ArrayD::zeros(IxDyn(&[2, 3]));
    let e = CpuBackend
        .fake_quant_backward(&x(), &dy, &QParams::per_tensor(0.1, 0), QuantRange::INT8)
        .unwrap_err();
    assert!(
        e.to_string().contains("[2, 3, 4]") && e.to_string().contains("[2, 3]"),
        "{e}"
    );
    let e = CpuBackend
        .linear(&Array2::zeros((2, 4)), &Array2::zeros((3, 5)), None)
        .unwrap_err();
    assert!(
        e.to_string().contains("[2, 4]") && e.to_string().contains("[3, 5]"),
        "{e}"
    );
}

fn conv_and_bn_channel_counts_disagree() {
    let w = ArrayD::zeros(IxDyn(&[8, 3, 3, 3]));
    let e = CpuBackend
        .fold_conv_bn(&w, None, &bn(6), false)
        .unwrap_err();
    assert!(matches!(e, Error::ChannelMismatch { .. }), "{e:?}");
    assert!(
        e.to_string()
            .contains("8 output channels but BatchNorm has 6"),
        "{e}"
    );
    let conv = Conv2d {
        weight: Array4::zeros((8, 3, 3, 3)),
        bias: None,
        params: Conv2dParams::default(),
    };
    let e = CpuBackend
        .conv_bn_act_eval(
            &Array4::zeros((1, 3, 5, 5)),
            &conv,
            &bn(6),
            Default::default(),
        )
        .unwrap_err();
    assert!(e.to_string().contains("BatchNorm has 6"), "{e}");
    let e = CpuBackend
        .fold_linear_bn(&Array2::zeros((4, 2)), None, &bn(5))
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("4 output channels but BatchNorm has 5"),
        "{e}"
    );
}

fn conv_settings_are_checked() {
    let x = Array4::zeros((1, 4, 5, 5));
    let w = Array4::zeros((6, 4, 3, 3));
    let p = Conv2dParams {
        groups: 3,
        ..Default::default()
    };
    let e = CpuBackend.conv2d(&x, &w, None, &p).unwrap_err();
    assert!(e.to_string().contains("groups = 3 must divide"), "{e}");
    let p = Conv2dParams {
        stride: [0, 1],
        ..Default::default()
    };
    assert!(CpuBackend.conv2d(&x, &w, None, &p).is_err());
    let big = Array4::zeros((6, 4, 7, 7));
    let e = CpuBackend
        .conv2d(&x, &big, None, &Conv2dParams::default())
        .unwrap_err();
    assert!(e.to_string().contains("larger than padded input"), "{e}");
}

fn missing_tensor_and_malformed_case() {
    let e = Case::from_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ", "mem").unwrap_err();
    assert!(e.to_string().starts_with("malformed case mem:"), "{e}");
    let mut sd = qfuse::io::StateDict::default();
    sd.metadata.insert("op".into(), "conv2d".into());
    sd.metadata.insert(
        "params".into(),
        r#"{"stride": [1, 1], "padding": [0, 0], "dilation": [1, 1], "groups": 1}"#.into(),
    );
    sd.metadata.insert("atol".into(), "1e-4".into());
    sd.metadata.insert("rtol".into(), "1e-4".into());
    sd.tensors.insert(
        "out.y".into(),
        qfuse::io::state_dict::HostTensor::F32(ArrayD::zeros(IxDyn(&[1]))),
    );
    let case = Case::from_bytes(&sd.to_bytes().unwrap(), "mem.safetensors").unwrap();
    let e = qfuse::conformance::ops::run_op(&case, &CpuBackend).unwrap_err();
    assert_eq!(e.to_string(), "missing tensor `in.x` in mem.safetensors");
}

fn nan_propagates_through_fake_quant() {
    let x = ArrayD::from_shape_vec(IxDyn(&[3]), vec![f32::NAN, 0.3, f32::NEG_INFINITY]).unwrap();
    let y = CpuBackend
        .fake_quant(&x, &QParams::per_tensor(0.1, 0), QuantRange::INT8)
        .unwrap();
    assert!(
        y[0].is_nan(),
        "PyTorch maps NaN to quant_min; qfuse propagates it"
    );
    assert_eq!(y[2], -128.0 * 0.1);
    let dx = CpuBackend
        .fake_quant_backward(
            &x,
            &ArrayD::ones(IxDyn(&[3])),
            &QParams::per_tensor(0.1, 0),
            QuantRange::INT8,
        )
        .unwrap();
    assert_eq!(dx[0], 0.0);
}

crate::qfuse_tests! {
    scale_not_positive_or_not_finite,
    quant_min_above_quant_max,
    zero_point_outside_range,
    axis_out_of_range,
    shape_mismatch_names_both_shapes,
    conv_and_bn_channel_counts_disagree,
    conv_settings_are_checked,
    missing_tensor_and_malformed_case,
    nan_propagates_through_fake_quant,
}
