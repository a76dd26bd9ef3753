//! The shipped digits file (`data/uci_digits.safetensors`, read through CARGO_MANIFEST_DIR,
//! nothing outside the repository) through `qfuse::data::digits`: counts, ranges, the resize, the embedded
//! copy, and typed errors for malformed files.

use std::collections::HashMap;
use std::path::PathBuf;

use qfuse::data::digits::{Digits, CLASSES, MNIST_MEAN, MNIST_STD};
use qfuse::Error;
use safetensors::tensor::{Dtype, TensorView};

fn file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/uci_digits.safetensors")
}

fn shipped_file_loads_with_the_documented_splits() {
    let d = Digits::load(file()).unwrap();
    assert_eq!(d.train.len(), 1437);
    assert_eq!(d.test.len(), 360);
    assert_eq!(d.train.images.shape(), &[1437, 1, 28, 28]);
    assert_eq!(d.test.images.shape(), &[360, 1, 28, 28]);
    for split in [&d.train, &d.test] {
        assert!(split.images.iter().all(|&v| (0.0..=1.0).contains(&v)));
        let mut counts = [0usize; CLASSES];
        for &l in &split.labels {
            counts[l as usize] += 1;
        }
        // Stratified: every digit present, roughly a tenth each.
        let n = split.len();
        for c in counts {
            assert!(c * 10 >= n * 8 / 10 && c * 10 <= n * 12 / 10, "{counts:?}");
        }
        // Real images: pixels cover the range, digits are not blank.
        let max = split.images.iter().cloned().fold(0.0f32, f32::max);
        assert_eq!(max, 1.0);
    }
    assert_eq!(Digits::bundled().unwrap(), d);
}

fn resize_keeps_the_8x8_pixels_at_their_centres() {
    // Raw pixel (i, j) of the 8×8 image sits at source coordinate i; output index d has source
    // (d + 0.5) · 8/28 − 0.5, so output 12 is source 3.07 and output 1 is source 0. Check the
    // loader against the raw file for one image by re-reading its bytes.
    let bytes = std::fs::read(file()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let raw = st.tensor("test.images").unwrap();
    let px = |n: usize, i: usize, j: usize| f32::from(raw.data()[n * 64 + i * 8 + j]) / 16.0;
    let d = Digits::bundled().unwrap();
    for n in [0, 7, 359] {
        // Output (1, 1): source 1.5·2/7 − 0.5 = −0.071, clamped to 0: pixel (0, 0) exactly.
        assert_eq!(d.test.images[[n, 0, 1, 1]], px(n, 0, 0));
        // Output (12, 12): source 12.5·2/7 − 0.5 = 43/14 = 3 + 1/14.
        let l = 1.0f32 / 14.0;
        let top = px(n, 3, 3) * (1.0 - l) + px(n, 3, 4) * l;
        let bottom = px(n, 4, 3) * (1.0 - l) + px(n, 4, 4) * l;
        let want = top * (1.0 - l) + bottom * l;
        assert!((d.test.images[[n, 0, 12, 12]] - want).abs() < 1e-6);
    }
}

fn normalize_and_batches() {
    let mut d = Digits::bundled().unwrap();
    let before = d.train.images[[0, 0, 14, 14]];
    d.normalize(MNIST_MEAN, MNIST_STD).unwrap();
    assert!((d.train.images[[0, 0, 14, 14]] - (before - MNIST_MEAN) / MNIST_STD).abs() < 1e-6);
    assert!(d.normalize(0.0, 0.0).is_err());
    assert!(d.normalize(f32::NAN, 1.0).is_err());
    let batches: Vec<_> = d.test.batches(64, Some(3)).unwrap().collect();
    assert_eq!(batches.len(), 6);
    assert_eq!(batches[5].labels.len(), 360 - 5 * 64);
    let again: Vec<_> = d.test.batches(64, Some(3)).unwrap().collect();
    assert_eq!(batches, again);
    let mut all: Vec<u32> = batches.iter().flat_map(|b| b.labels.clone()).collect();
    let mut labels = d.test.labels.clone();
    all.sort_unstable();
    labels.sort_unstable();
    assert_eq!(all, labels);
}

/// A digits-shaped file with one tensor replaced.
fn with(name: &str, dtype: Dtype, shape: Vec<usize>, data: Vec<u8>) -> Vec<u8> {
    let bytes = std::fs::read(file()).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut owned: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = st
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    owned.retain(|t| t.0 != name);
    if !data.is_empty() || shape.contains(&0) {
        owned.push((name.to_string(), dtype, shape, data));
    }
    let views: Vec<(String, TensorView)> = owned
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, &None::<HashMap<String, String>>).unwrap()
}

fn malformed_files_are_typed_errors() {
    let e = Digits::from_bytes(b"not safetensors", "x").unwrap_err();
    assert!(matches!(e, Error::MalformedStateDict { .. }), "{e}");

    let e = Digits::from_bytes(&with("test.labels", Dtype::U8, vec![], vec![]), "f").unwrap_err();
    assert!(matches!(e, Error::MissingTensor { .. }), "{e}");
    assert!(e.to_string().contains("test.labels"), "{e}");

    let e = Digits::from_bytes(
        &with("test.labels", Dtype::I32, vec![360], vec![0; 360 * 4]),
        "f",
    )
    .unwrap_err();
    assert_eq!(
        e.to_string(),
        "tensor `test.labels` is int32, expected uint8"
    );

    let e = Digits::from_bytes(
        &with("test.labels", Dtype::U8, vec![359], vec![0; 359]),
        "f",
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");

    let e = Digits::from_bytes(
        &with(
            "train.images",
            Dtype::U8,
            vec![1437, 8, 7],
            vec![0; 1437 * 56],
        ),
        "f",
    )
    .unwrap_err();
    assert!(matches!(e, Error::ShapeMismatch { .. }), "{e}");

    let mut big = vec![0u8; 360 * 64];
    big[100] = 17;
    let e =
        Digits::from_bytes(&with("test.images", Dtype::U8, vec![360, 8, 8], big), "f").unwrap_err();
    assert!(e.to_string().contains("pixel 17 at flat index 100"), "{e}");

    let mut labels = vec![0u8; 360];
    labels[3] = 10;
    let e =
        Digits::from_bytes(&with("test.labels", Dtype::U8, vec![360], labels), "f").unwrap_err();
    assert!(e.to_string().contains("label 10 at index 3"), "{e}");

    let e = Digits::load("/nonexistent/digits.safetensors").unwrap_err();
    assert!(matches!(e, Error::Io { .. }), "{e}");
}

crate::qfuse_tests! {
    shipped_file_loads_with_the_documented_splits,
    resize_keeps_the_8x8_pixels_at_their_centres,
    normalize_and_batches,
    malformed_files_are_typed_errors,
}
