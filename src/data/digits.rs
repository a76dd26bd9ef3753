//! The UCI "Optical Recognition of Handwritten Digits" data set (E. Alpaydin and C. Kaynak,
//! 1998, DOI 10.24432/C50P49, as shipped by scikit-learn's `load_digits`; license CC BY 4.0),
//! in the repository as `data/uci_digits.safetensors` (see `data/README.md`) and embedded in
//! the library ([`Digits::bundled`]).
//!
//! The file holds uint8 tensors `train.images` `[1437, 8, 8]`, `train.labels` `[1437]`,
//! `test.images` `[360, 8, 8]` and `test.labels` `[360]`, pixels 0..=16, labels 0..=9. The
//! loader checks every dtype, shape and value ([`crate::Error`] otherwise), scales pixels to
//! [0, 1] (÷16, exact in f32) and resizes them to 1×28×28, the input of NNI's Mnist network
//! ([`crate::model::mnist`]), with [`resize_bilinear`]: bilinear interpolation with
//! `align_corners=False`, PyTorch's
//! `F.interpolate(x, size=(28, 28), mode="bilinear", align_corners=False)`.
//!
//! ```
//! use qfuse::data::digits::{Digits, MNIST_MEAN, MNIST_STD};
//!
//! let mut digits = Digits::bundled()?;
//! assert_eq!(digits.train.len(), 1437);
//! assert_eq!(digits.test.images.shape(), &[360, 1, 28, 28]);
//! digits.normalize(MNIST_MEAN, MNIST_STD)?; // as NNI's example does
//! let mut seen = 0;
//! for batch in digits.train.batches(64, Some(0))? {
//!     assert!(batch.labels.len() <= 64);
//!     seen += batch.labels.len();
//! }
//! assert_eq!(seen, 1437);
//! # Ok::<(), qfuse::Error>(())
//! ```

use std::path::Path;

use ndarray::{s, Array3, Array4, Axis};

use crate::error::{Error, Result};
use crate::io::state_dict::{dtype_name, parse_state_dict, Dtype, StateDict};

/// The digits file as shipped in the repository (`data/uci_digits.safetensors`).
const BUNDLED: &[u8] = include_bytes!("../../data/uci_digits.safetensors");

/// Side of the square images NNI's Mnist network takes (1×28×28).
pub const MNIST_SIDE: usize = 28;

/// The largest pixel value of the file (on-pixels counted in a 4×4 block).
pub const MAX_PIXEL: u8 = 16;

/// Number of classes (digits 0..=9).
pub const CLASSES: usize = 10;

/// MNIST's mean pixel, as NNI's example normalizes (`transforms.Normalize((0.1307,), ...)`).
pub const MNIST_MEAN: f32 = 0.1307;

/// MNIST's pixel standard deviation (`transforms.Normalize(..., (0.3081,))`).
pub const MNIST_STD: f32 = 0.3081;

/// One split: images `[N, 1, 28, 28]` (f32) and their labels.
#[derive(Debug, Clone, PartialEq)]
pub struct Split {
    /// Images `[N, 1, 28, 28]`, pixels in [0, 1] until [`Split::normalize`].
    pub images: Array4<f32>,
    /// Labels `0..=9`, one per image.
    pub labels: Vec<u32>,
}

/// The train and test splits.
#[derive(Debug, Clone, PartialEq)]
pub struct Digits {
    /// 1,437 training images in the shipped file.
    pub train: Split,
    /// 360 test images in the shipped file.
    pub test: Split,
}

/// One batch of a [`Batches`] iterator.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    /// Images `[B, 1, 28, 28]`.
    pub images: Array4<f32>,
    /// Labels, one per image.
    pub labels: Vec<u32>,
}

impl Digits {
    /// The copy embedded in the library (the repository's `data/uci_digits.safetensors`).
    ///
    /// Errors: none for the shipped file; see [`Digits::from_bytes`].
    pub fn bundled() -> Result<Self> {
        Self::from_bytes(BUNDLED, "bundled data/uci_digits.safetensors")
    }

    /// Reads a digits file ([`Error::Io`] when it cannot be read; then as
    /// [`Digits::from_bytes`]).
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| Error::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parses the safetensors bytes of a digits file; `origin` names it in errors.
    ///
    /// Errors: [`Error::MalformedStateDict`] for bytes that are not safetensors or a pixel
    /// above 16 or a label above 9; [`Error::MissingTensor`] for an absent tensor;
    /// [`Error::DtypeMismatch`] for a tensor that is not uint8; [`Error::ShapeMismatch`] for
    /// images that are not `[N, 8, 8]` or labels that are not `[N]`.
    pub fn from_bytes(bytes: &[u8], origin: &str) -> Result<Self> {
        let sd = parse_state_dict(bytes, origin)?;
        Ok(Self {
            train: split(&sd, origin, "train")?,
            test: split(&sd, origin, "test")?,
        })
    }

    /// Normalizes both splits: `(x - mean) / std` per pixel (torchvision's `Normalize`).
    ///
    /// Errors: [`Error::InvalidArgument`] unless `mean` is finite and `std` positive and finite.
    pub fn normalize(&mut self, mean: f32, std: f32) -> Result<()> {
        self.train.normalize(mean, std)?;
        self.test.normalize(mean, std)
    }
}

fn uint8<'a>(sd: &'a StateDict, origin: &str, name: &str) -> Result<(&'a [usize], &'a [u8])> {
    if let Some(t) = sd.raw.get(name) {
        if t.dtype() != Dtype::U8 {
            return Err(Error::DtypeMismatch {
                name: name.to_string(),
                got: dtype_name(t.dtype()).to_string(),
                expected: "uint8".to_string(),
            });
        }
        return Ok((t.shape(), t.data()));
    }
    if let Some(dtype) = sd.dtype(name) {
        return Err(Error::DtypeMismatch {
            name: name.to_string(),
            got: dtype_name(dtype).to_string(),
            expected: "uint8".to_string(),
        });
    }
    Err(Error::MissingTensor {
        name: name.to_string(),
        context: format!(" in {}", origin.escape_debug()),
    })
}

fn split(sd: &StateDict, origin: &str, which: &str) -> Result<Split> {
    let images_name = format!("{which}.images");
    let labels_name = format!("{which}.labels");
    let (ishape, ibytes) = uint8(sd, origin, &images_name)?;
    let (lshape, lbytes) = uint8(sd, origin, &labels_name)?;
    let n = match *ishape {
        [n, 8, 8] => n,
        _ => {
            let n = ishape.first().copied().unwrap_or(0);
            return Err(Error::shape(images_name, &[n, 8, 8], ishape));
        }
    };
    if lshape != [n] {
        return Err(Error::shape(
            format!("{labels_name} (one per image of {images_name})"),
            &[n],
            lshape,
        ));
    }
    let malformed = |reason: String| Error::MalformedStateDict {
        path: origin.escape_debug().to_string(),
        reason,
    };
    if let Some(i) = ibytes.iter().position(|&p| p > MAX_PIXEL) {
        return Err(malformed(format!(
            "{images_name}: pixel {} at flat index {i} is above {MAX_PIXEL}",
            ibytes[i]
        )));
    }
    if let Some(i) = lbytes.iter().position(|&l| usize::from(l) >= CLASSES) {
        return Err(malformed(format!(
            "{labels_name}: label {} at index {i} is not a digit 0..=9",
            lbytes[i]
        )));
    }
    let scale = 1.0 / f32::from(MAX_PIXEL);
    let small = Array3::from_shape_vec(
        (n, 8, 8),
        ibytes.iter().map(|&p| f32::from(p) * scale).collect(),
    )
    .map_err(|e| malformed(format!("{images_name}: {e}")))?;
    let small = small.insert_axis(Axis(1));
    let images = resize_bilinear(&small, MNIST_SIDE, MNIST_SIDE)?;
    Ok(Split {
        images,
        labels: lbytes.iter().map(|&l| u32::from(l)).collect(),
    })
}

/// Source index and weights of one output coordinate (PyTorch's
/// `compute_indices_weights_linear` for `align_corners=False`).
fn linear_taps(in_size: usize, out_size: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|d| {
            let src = (scale * (d as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(in_size - 1);
            let lambda = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = (i0 + 1).min(in_size - 1);
            (i0, i1, 1.0 - lambda, lambda)
        })
        .collect()
}

/// Bilinear resize of an NCHW batch to `[N, C, oh, ow]` with `align_corners=False`, mirroring
/// `torch.nn.functional.interpolate(x, size=(oh, ow), mode="bilinear", align_corners=False)`
/// on the CPU: the source coordinate of output index `d` is
/// `max(0, (d + 0.5) · in / out − 0.5)`, split into `i0 = floor`, `i1 = min(i0 + 1, in − 1)`
/// and weights `1 − λ`, `λ`; an output pixel is
/// `(x[i0, j0]·w0 + x[i0, j1]·w1)·h0 + (x[i1, j0]·w0 + x[i1, j1]·w1)·h1` in f32 (PyTorch's
/// order: width inside, height outside).
///
/// Errors: [`Error::InvalidArgument`] for an empty input plane or a zero output size.
pub fn resize_bilinear(x: &Array4<f32>, oh: usize, ow: usize) -> Result<Array4<f32>> {
    let (n, c, h, w) = x.dim();
    if h == 0 || w == 0 || oh == 0 || ow == 0 {
        return Err(Error::invalid(format!(
            "resize_bilinear: input plane {h}×{w} and output size {oh}×{ow} must be non-empty"
        )));
    }
    let rows = linear_taps(h, oh);
    let cols = linear_taps(w, ow);
    let mut out = Array4::<f32>::zeros((n, c, oh, ow));
    for b in 0..n {
        for ch in 0..c {
            let src = x.slice(s![b, ch, .., ..]);
            let mut dst = out.slice_mut(s![b, ch, .., ..]);
            for (oy, &(y0, y1, h0, h1)) in rows.iter().enumerate() {
                for (ox, &(x0, x1, w0, w1)) in cols.iter().enumerate() {
                    let top = src[[y0, x0]] * w0 + src[[y0, x1]] * w1;
                    let bottom = src[[y1, x0]] * w0 + src[[y1, x1]] * w1;
                    dst[[oy, ox]] = top * h0 + bottom * h1;
                }
            }
        }
    }
    Ok(out)
}

impl Split {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// `true` when the split has no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Normalizes the images in place: `(x - mean) / std` (torchvision's `Normalize`).
    ///
    /// Errors: [`Error::InvalidArgument`] unless `mean` is finite and `std` positive and finite.
    pub fn normalize(&mut self, mean: f32, std: f32) -> Result<()> {
        if !(mean.is_finite() && std.is_finite() && std > 0.0) {
            return Err(Error::invalid(format!(
                "normalize: mean must be finite and std positive and finite, got mean {mean}, std {std}"
            )));
        }
        self.images.mapv_inplace(|v| (v - mean) / std);
        Ok(())
    }

    /// Batches of `batch_size` images (the last one smaller when `batch_size` does not divide
    /// the split, as PyTorch's `DataLoader` with `drop_last=False`): in file order with
    /// `shuffle = None`, else in a permutation drawn from the seed (Fisher–Yates over
    /// SplitMix64; the same seed gives the same batches on every platform).
    ///
    /// Errors: [`Error::InvalidArgument`] for a zero batch size.
    pub fn batches(&self, batch_size: usize, shuffle: Option<u64>) -> Result<Batches<'_>> {
        if batch_size == 0 {
            return Err(Error::invalid("batches: batch size must be positive"));
        }
        let mut order: Vec<usize> = (0..self.len()).collect();
        if let Some(seed) = shuffle {
            let mut rng = SplitMix64(seed);
            for i in (1..order.len()).rev() {
                let j = rng.below(i as u64 + 1) as usize;
                order.swap(i, j);
            }
        }
        Ok(Batches {
            split: self,
            order,
            batch_size,
            next: 0,
        })
    }
}

/// SplitMix64 (Steele, Lea and Flood), the seeded generator of [`Split::batches`].
struct SplitMix64(u64);

impl SplitMix64 {
    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..bound` (`bound > 0`), without modulo bias (Lemire's rejection).
    fn below(&mut self, bound: u64) -> u64 {
        let threshold = bound.wrapping_neg() % bound;
        loop {
            let m = u128::from(self.next_u64()) * u128::from(bound);
            if (m as u64) >= threshold {
                return (m >> 64) as u64;
            }
        }
    }
}

/// Iterator over the batches of a [`Split`] (see [`Split::batches`]).
#[derive(Debug)]
pub struct Batches<'a> {
    split: &'a Split,
    order: Vec<usize>,
    batch_size: usize,
    next: usize,
}

impl Batches<'_> {
    /// The image indices in the order the batches visit them.
    pub fn order(&self) -> &[usize] {
        &self.order
    }
}

impl Iterator for Batches<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.order.len() {
            return None;
        }
        let end = self
            .next
            .saturating_add(self.batch_size)
            .min(self.order.len());
        let idx = &self.order[self.next..end];
        self.next = end;
        Some(Batch {
            images: self.split.images.select(Axis(0), idx),
            labels: idx.iter().map(|&i| self.split.labels[i]).collect(),
        })
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = (self.order.len() - self.next).div_ceil(self.batch_size);
        (left, Some(left))
    }
}

impl ExactSizeIterator for Batches<'_> {}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::Array;

    #[test]
    fn taps_match_pytorch_formula() {
        // 8 -> 28: scale 8/28; output 0 maps to -0.357 -> clamped to 0; output 5 to
        // 5.5 * 8/28 - 0.5 = 1.0714...; the last output to 27.5 * 8/28 - 0.5 = 7.357 -> i0 = 7,
        // i1 clamped to 7.
        let t = linear_taps(8, 28);
        assert_eq!((t[0].0, t[0].1, t[0].2, t[0].3), (0, 1, 1.0, 0.0));
        let (i0, i1, w0, w1) = t[5];
        assert_eq!((i0, i1), (1, 2));
        assert!((w1 - (5.5f32 * 8.0 / 28.0 - 1.5)).abs() < 1e-6);
        assert!((w0 + w1 - 1.0).abs() < 1e-7);
        assert_eq!((t[27].0, t[27].1), (7, 7));
    }

    #[test]
    fn bilinear_hand_computed() {
        // x[i, j] = 10 i + j on an 8×8 plane. Output (5, 5): rows 1 and 2 with λ = 1/14
        // (5.5 · 2/7 − 0.5 = 15/14 → 1 + 1/14); same for columns. A bilinear interpolation of
        // an affine function is the function at the source point: 10·15/14 + 15/14 = 165/14.
        let x = Array::from_shape_fn((1, 1, 8, 8), |(_, _, i, j)| (10 * i + j) as f32);
        let y = resize_bilinear(&x, 28, 28).unwrap();
        assert_eq!(y.dim(), (1, 1, 28, 28));
        assert!(
            (y[[0, 0, 5, 5]] - 165.0 / 14.0).abs() < 1e-5,
            "{}",
            y[[0, 0, 5, 5]]
        );
        // Corners are clamped copies of the input corners.
        assert_eq!(y[[0, 0, 0, 0]], 0.0);
        assert_eq!(y[[0, 0, 27, 27]], 77.0);
        // Output (0, 5): row 0 exactly, columns 1 and 2 → 15/14.
        assert!((y[[0, 0, 0, 5]] - 15.0 / 14.0).abs() < 1e-6);
        // A constant plane stays constant.
        let c = Array4::<f32>::from_elem((2, 1, 8, 8), 0.75);
        assert!(resize_bilinear(&c, 28, 28)
            .unwrap()
            .iter()
            .all(|&v| (v - 0.75).abs() < 1e-7));
        assert!(resize_bilinear(&c, 0, 28).is_err());
    }

    #[test]
    fn shuffle_is_a_seeded_permutation() {
        let s = Split {
            images: Array4::from_shape_fn((10, 1, 1, 1), |(i, _, _, _)| i as f32),
            labels: (0..10).collect(),
        };
        let a: Vec<usize> = s.batches(3, Some(7)).unwrap().order().to_vec();
        let b: Vec<usize> = s.batches(3, Some(7)).unwrap().order().to_vec();
        let c: Vec<usize> = s.batches(3, Some(8)).unwrap().order().to_vec();
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..10).collect::<Vec<_>>());
        let batches: Vec<Batch> = s.batches(3, Some(7)).unwrap().collect();
        assert_eq!(
            batches.iter().map(|b| b.labels.len()).collect::<Vec<_>>(),
            [3, 3, 3, 1]
        );
        // Images travel with their labels.
        for b in &batches {
            for (k, &l) in b.labels.iter().enumerate() {
                assert_eq!(b.images[[k, 0, 0, 0]], l as f32);
            }
        }
        assert_eq!(
            s.batches(4, None).unwrap().next().unwrap().labels,
            [0, 1, 2, 3]
        );
        assert!(s.batches(0, None).is_err());
    }
}
