//! Observers: min/max statistics and the quantization parameters computed from them, mirroring
//! `torch.ao.quantization.observer` (`MinMaxObserver`, `MovingAverageMinMaxObserver`,
//! `PerChannelMinMaxObserver`, `MovingAveragePerChannelMinMaxObserver` and their shared
//! `_calculate_qparams`).
//!
//! Arithmetic is in f32 in PyTorch's order, so scales match PyTorch bit for bit:
//!
//! ```text
//! min_neg = min(min, 0); max_pos = max(max, 0)
//! symmetric: scale = max(max(-min_neg, max_pos) / ((qmax - qmin) / 2), eps)
//!            zp    = 0 (qint8); for quint8 (qmin + qmax) // 2 with a customized range
//!                    (`ObserverSpec::customized_range`, 127 for an explicit [0, 255]), else 128
//! affine:    scale = max((max_pos - min_neg) / (qmax - qmin), eps)
//!            zp    = clamp(qmin - round_ties_even(min_neg / scale), qmin, qmax)
//! ```
//!
//! Never-observed statistics (an empty tensor: min = +inf, max = -inf) give scale 1.0 and zero
//! point 0, as in PyTorch. **NaN propagates**: a NaN in the observed data makes min, max and
//! the scale NaN; the zero point is then 0 for affine schemes (clamped into the range) and the
//! usual constant for symmetric ones. No error is raised (PyTorch does not raise either).

use ndarray::ArrayD;

use crate::error::{Error, Result};
use crate::quant::{ObserverSpec, QParams};

/// `torch.minimum` on scalars: NaN if either is NaN.
#[inline]
fn nan_min(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b < a {
        b
    } else {
        a
    }
}

/// `torch.maximum` on scalars: NaN if either is NaN.
#[inline]
fn nan_max(a: f32, b: f32) -> f32 {
    if a.is_nan() || b.is_nan() {
        f32::NAN
    } else if b > a {
        b
    } else {
        a
    }
}

/// Min and max of a slice, NaN if any element is NaN, `(+inf, -inf)` if empty.
fn slice_min_max(v: &[f32]) -> (f32, f32) {
    let (mut mn, mut mx) = (f32::INFINITY, f32::NEG_INFINITY);
    let mut nan = false;
    for &x in v {
        nan |= x.is_nan();
        mn = if x < mn { x } else { mn };
        mx = if x > mx { x } else { mx };
    }
    if nan {
        (f32::NAN, f32::NAN)
    } else {
        (mn, mx)
    }
}

/// Minimum and maximum of all elements of `x`, mirroring `torch.aminmax(x)` as
/// `MinMaxObserver.forward` uses it. A NaN anywhere gives `(NaN, NaN)`; an empty tensor gives
/// `(+inf, -inf)` (PyTorch's initial, never-observed state; `aminmax` itself would raise).
pub fn min_max(x: &ArrayD<f32>) -> (f32, f32) {
    match x.as_slice_memory_order() {
        Some(s) => slice_min_max(s),
        None => {
            let v: Vec<f32> = x.iter().copied().collect();
            slice_min_max(&v)
        }
    }
}

/// Per-channel minimum and maximum along `axis`, mirroring `PerChannelMinMaxObserver`'s
/// `torch.aminmax(torch.flatten(x.permute(axis to front), start_dim=1), dim=1)`. A channel
/// containing NaN gives NaN for both; a channel with no elements gives `(+inf, -inf)`.
///
/// Errors: [`Error::AxisOutOfRange`] when `axis >= x.ndim()` (resolve a negative axis with
/// [`crate::quant::resolve_axis`] first).
pub fn min_max_per_channel(x: &ArrayD<f32>, axis: usize) -> Result<(Vec<f32>, Vec<f32>)> {
    let shape = x.shape();
    if axis >= shape.len() {
        return Err(Error::axis(axis, shape.len()));
    }
    let c = shape[axis];
    let inner: usize = shape[axis + 1..].iter().product();
    let mut mn = vec![f32::INFINITY; c];
    let mut mx = vec![f32::NEG_INFINITY; c];
    let mut nan = vec![false; c];
    let xs = x.as_standard_layout();
    let data = xs
        .as_slice()
        .ok_or_else(|| Error::invalid("internal: standard-layout array is not contiguous"))?;
    if !data.is_empty() {
        for (block, chunk) in data.chunks_exact(inner).enumerate() {
            let ch = block % c;
            let (a, b) = slice_min_max(chunk);
            if a.is_nan() {
                nan[ch] = true;
            } else {
                mn[ch] = if a < mn[ch] { a } else { mn[ch] };
                mx[ch] = if b > mx[ch] { b } else { mx[ch] };
            }
        }
    }
    for ch in 0..c {
        if nan[ch] {
            mn[ch] = f32::NAN;
            mx[ch] = f32::NAN;
        }
    }
    Ok((mn, mx))
}

/// The zero point of symmetric schemes (one home: [`ObserverSpec::symmetric_zero_point`]).
pub fn symmetric_zero_point(spec: &ObserverSpec) -> i32 {
    spec.symmetric_zero_point()
}

/// One channel of `_calculate_qparams`.
fn qparams_one(min: f32, max: f32, spec: &ObserverSpec) -> (f32, i32) {
    if min == f32::INFINITY && max == f32::NEG_INFINITY {
        // check_min_max_valid: never observed.
        return (1.0, 0);
    }
    let qmin = spec.range.quant_min as i64;
    let qmax = spec.range.quant_max as i64;
    let min_neg = nan_min(min, 0.0);
    let max_pos = nan_max(max, 0.0);
    if spec.qscheme.is_symmetric() {
        let amax = nan_max(-min_neg, max_pos);
        // `float(quant_max - quant_min) / 2` is a Python float, cast to f32 for the division.
        let half_range = ((qmax - qmin) as f64 / 2.0) as f32;
        let scale = nan_max(amax / half_range, spec.eps);
        (scale, symmetric_zero_point(spec))
    } else {
        let range = (qmax - qmin) as f64 as f32;
        let scale = nan_max((max_pos - min_neg) / range, spec.eps);
        let zp = if scale.is_nan() {
            0i64.clamp(qmin, qmax)
        } else {
            // `torch.round(...).to(torch.int)`; saturating for the (impossible for finite data)
            // out-of-range cases.
            let r = (min_neg / scale).round_ties_even() as i32 as i64;
            (qmin - r).clamp(qmin, qmax)
        };
        (scale, zp as i32)
    }
}

/// Quantization parameters from per-tensor (`min.len() == 1`) or per-channel min/max, mirroring
/// `torch.ao.quantization.observer._ObserverBase._calculate_qparams` exactly (formulas in the
/// [module docs](self)). Per-tensor schemes give [`QParams::per_tensor`] from the first pair;
/// per-channel schemes give one pair per channel with `axis = spec.axis` (resolved first with
/// [`ObserverSpec::for_rank`]; a still negative axis, which only a never-observed observer
/// has, gives axis 0).
///
/// Never-observed values (`min = +inf, max = -inf`, or empty slices) give scale 1.0 and zero
/// point 0, as PyTorch's `check_min_max_valid` does (for empty per-channel statistics that is
/// one channel, as in PyTorch). NaN propagates to a NaN scale. Where PyTorch asserts
/// `min <= max`, this computes the formula anyway. Extra elements of the longer slice are
/// ignored when the lengths differ.
pub fn calculate_qparams(min: &[f32], max: &[f32], spec: &ObserverSpec) -> QParams {
    let pairs: Vec<(f32, i32)> = min
        .iter()
        .zip(max)
        .map(|(&a, &b)| qparams_one(a, b, spec))
        .collect();
    if spec.qscheme.is_per_channel() {
        let axis = Some(usize::try_from(spec.axis).unwrap_or(0));
        if pairs.is_empty() {
            return QParams {
                scale: vec![1.0],
                zero_point: vec![0],
                axis,
            };
        }
        let (scale, zero_point) = pairs.into_iter().unzip();
        QParams {
            scale,
            zero_point,
            axis,
        }
    } else {
        let (s, z) = pairs.first().copied().unwrap_or((1.0, 0));
        QParams::per_tensor(s, z)
    }
}

/// Observes `x` once and returns its quantization parameters: `MinMaxObserver` (per-tensor
/// schemes) or `PerChannelMinMaxObserver` with `ch_axis = spec.axis` (per-channel schemes; a
/// negative axis counts from the end), one forward, then `calculate_qparams()`.
///
/// An empty tensor gives scale 1.0 and zero point 0 (per channel: for every channel, where
/// PyTorch returns a single never-observed pair). NaN propagates to a NaN scale.
///
/// Errors: those of [`ObserverSpec::validate`] for a bad range, [`Error::AxisOutOfRange`] for
/// a per-channel axis the tensor does not have.
pub fn observe_qparams(x: &ArrayD<f32>, spec: &ObserverSpec) -> Result<QParams> {
    spec.validate()?;
    if spec.qscheme.is_per_channel() {
        let spec = spec.for_rank(x.ndim())?;
        let axis = spec.channel_axis(x.ndim())?;
        let (mn, mx) = min_max_per_channel(x, axis)?;
        if mn.is_empty() {
            return QParams::per_channel(Vec::new(), Vec::new(), axis);
        }
        Ok(calculate_qparams(&mn, &mx, &spec))
    } else {
        let (mn, mx) = min_max(x);
        Ok(calculate_qparams(&[mn], &[mx], spec))
    }
}

/// How running statistics combine with a new batch.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Averaging {
    /// Running min/max (`MinMaxObserver`).
    MinMax,
    /// `min += c * (min_cur - min)` after the first batch (`MovingAverageMinMaxObserver`).
    Moving(f32),
}

/// The state all four observers share.
#[derive(Debug, Clone, PartialEq)]
struct ObserverState {
    spec: ObserverSpec,
    averaging: Averaging,
    per_channel: bool,
    min: Vec<f32>,
    max: Vec<f32>,
}

impl ObserverState {
    fn new(spec: ObserverSpec, averaging: Averaging, per_channel: bool) -> Result<Self> {
        spec.validate()?;
        if spec.qscheme.is_per_channel() != per_channel {
            return Err(Error::invalid(format!(
                "{} observers need a {} qscheme, got {:?}",
                if per_channel {
                    "per-channel"
                } else {
                    "per-tensor"
                },
                if per_channel {
                    "per-channel"
                } else {
                    "per-tensor"
                },
                spec.qscheme
            )));
        }
        if let Averaging::Moving(c) = averaging {
            if !(0.0..=1.0).contains(&c) {
                return Err(Error::invalid(format!(
                    "averaging_constant must be in [0, 1], got {c}"
                )));
            }
        }
        let (min, max) = if per_channel {
            (Vec::new(), Vec::new())
        } else {
            (vec![f32::INFINITY], vec![f32::NEG_INFINITY])
        };
        Ok(Self {
            spec,
            averaging,
            per_channel,
            min,
            max,
        })
    }

    fn observe(&mut self, x: &ArrayD<f32>) -> Result<()> {
        if x.is_empty() {
            return Ok(());
        }
        let (cur_min, cur_max) = if self.per_channel {
            // A negative axis is resolved against the first batch's rank and kept so.
            let spec = self.spec.for_rank(x.ndim())?;
            let cur = min_max_per_channel(x, spec.channel_axis(x.ndim())?)?;
            self.spec = spec;
            cur
        } else {
            let (a, b) = min_max(x);
            (vec![a], vec![b])
        };
        let first = if self.per_channel {
            self.min.is_empty()
        } else {
            self.min[0] == f32::INFINITY && self.max[0] == f32::NEG_INFINITY
        };
        if self.per_channel && !first && cur_min.len() != self.min.len() {
            return Err(Error::shape(
                format!(
                    "per-channel observer (channels along axis {})",
                    self.spec.axis
                ),
                &[self.min.len()],
                &[cur_min.len()],
            ));
        }
        match self.averaging {
            Averaging::MinMax => {
                if first && self.per_channel {
                    self.min = cur_min;
                    self.max = cur_max;
                } else {
                    for (m, c) in self.min.iter_mut().zip(cur_min) {
                        *m = nan_min(c, *m);
                    }
                    for (m, c) in self.max.iter_mut().zip(cur_max) {
                        *m = nan_max(c, *m);
                    }
                }
            }
            Averaging::Moving(k) => {
                if first {
                    self.min = cur_min;
                    self.max = cur_max;
                } else {
                    for (m, c) in self.min.iter_mut().zip(cur_min) {
                        *m = *m + k * (c - *m);
                    }
                    for (m, c) in self.max.iter_mut().zip(cur_max) {
                        *m = *m + k * (c - *m);
                    }
                }
            }
        }
        Ok(())
    }
}

macro_rules! observer_common {
    ($t:ident) => {
        impl $t {
            /// Updates the statistics with one batch (`forward`); empty tensors are ignored.
            ///
            /// Errors: [`Error::AxisOutOfRange`] (per-channel axis the tensor lacks),
            /// [`Error::ShapeMismatch`] (per-channel count differs from earlier batches).
            pub fn observe(&mut self, x: &ArrayD<f32>) -> Result<()> {
                self.0.observe(x)
            }
            /// The current quantization parameters (`calculate_qparams`); scale 1.0 and zero
            /// point 0 before any observation.
            pub fn qparams(&self) -> QParams {
                calculate_qparams(&self.0.min, &self.0.max, &self.0.spec)
            }
            /// Running minimum (`min_val`): one value per tensor (`+inf` before any
            /// observation), or one per channel (empty before any observation).
            pub fn min_val(&self) -> &[f32] {
                &self.0.min
            }
            /// Running maximum (`max_val`), like [`Self::min_val`].
            pub fn max_val(&self) -> &[f32] {
                &self.0.max
            }
            /// The spec this observer computes qparams with.
            pub fn spec(&self) -> &ObserverSpec {
                &self.0.spec
            }
        }
    };
}

/// `torch.ao.quantization.MinMaxObserver`: running min/max over all batches (initialised to
/// `+inf` / `-inf`), for per-tensor schemes.
#[derive(Debug, Clone, PartialEq)]
pub struct MinMaxObserver(ObserverState);

impl MinMaxObserver {
    /// A fresh observer. Errors: a bad range, or a per-channel `spec.qscheme`
    /// ([`Error::InvalidArgument`]).
    pub fn new(spec: ObserverSpec) -> Result<Self> {
        ObserverState::new(spec, Averaging::MinMax, false).map(Self)
    }
}
observer_common!(MinMaxObserver);

/// `torch.ao.quantization.MovingAverageMinMaxObserver`: the first batch's min/max, then
/// `min += c * (min_cur - min)` (likewise max), for per-tensor schemes.
#[derive(Debug, Clone, PartialEq)]
pub struct MovingAverageMinMaxObserver(ObserverState);

impl MovingAverageMinMaxObserver {
    /// A fresh observer with PyTorch's default `averaging_constant = 0.01`.
    /// Errors: as [`MinMaxObserver::new`].
    pub fn new(spec: ObserverSpec) -> Result<Self> {
        Self::with_averaging_constant(spec, 0.01)
    }
    /// A fresh observer with `averaging_constant = c` (in `[0, 1]`, else
    /// [`Error::InvalidArgument`]).
    pub fn with_averaging_constant(spec: ObserverSpec, c: f32) -> Result<Self> {
        ObserverState::new(spec, Averaging::Moving(c), false).map(Self)
    }
    /// The averaging constant `c`.
    pub fn averaging_constant(&self) -> f32 {
        match self.0.averaging {
            Averaging::Moving(c) => c,
            Averaging::MinMax => 1.0,
        }
    }
}
observer_common!(MovingAverageMinMaxObserver);

/// `torch.ao.quantization.PerChannelMinMaxObserver` with `ch_axis = spec.axis`: running
/// per-channel min/max, for per-channel schemes.
#[derive(Debug, Clone, PartialEq)]
pub struct PerChannelMinMaxObserver(ObserverState);

impl PerChannelMinMaxObserver {
    /// A fresh observer. Errors: a bad range, or a per-tensor `spec.qscheme`
    /// ([`Error::InvalidArgument`], as PyTorch's `NotImplementedError`).
    pub fn new(spec: ObserverSpec) -> Result<Self> {
        ObserverState::new(spec, Averaging::MinMax, true).map(Self)
    }
}
observer_common!(PerChannelMinMaxObserver);

/// `torch.ao.quantization.MovingAveragePerChannelMinMaxObserver` with `ch_axis = spec.axis`:
/// the first batch's per-channel min/max, then the moving average per channel.
#[derive(Debug, Clone, PartialEq)]
pub struct MovingAveragePerChannelMinMaxObserver(ObserverState);

impl MovingAveragePerChannelMinMaxObserver {
    /// A fresh observer with PyTorch's default `averaging_constant = 0.01`.
    /// Errors: as [`PerChannelMinMaxObserver::new`].
    pub fn new(spec: ObserverSpec) -> Result<Self> {
        Self::with_averaging_constant(spec, 0.01)
    }
    /// A fresh observer with `averaging_constant = c` (in `[0, 1]`, else
    /// [`Error::InvalidArgument`]).
    pub fn with_averaging_constant(spec: ObserverSpec, c: f32) -> Result<Self> {
        ObserverState::new(spec, Averaging::Moving(c), true).map(Self)
    }
    /// The averaging constant `c`.
    pub fn averaging_constant(&self) -> f32 {
        match self.0.averaging {
            Averaging::Moving(c) => c,
            Averaging::MinMax => 1.0,
        }
    }
}
observer_common!(MovingAveragePerChannelMinMaxObserver);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::{QDtype, QScheme, QuantRange};
    use ndarray::{arr1, Array, ArrayD, IxDyn};

    fn spec(dtype: QDtype, qscheme: QScheme, range: QuantRange) -> ObserverSpec {
        ObserverSpec::new(dtype, qscheme, range, 0).unwrap()
    }

    fn obs(v: &[f32], s: &ObserverSpec) -> (f32, i32) {
        let qp = observe_qparams(&arr1(v).into_dyn(), s).unwrap();
        (qp.scale[0], qp.zero_point[0])
    }

    #[test]
    fn pytorch_values() {
        use QDtype::*;
        use QScheme::*;
        let u8a = spec(QUInt8, PerTensorAffine, QuantRange::UINT8);
        let i8a = spec(QInt8, PerTensorAffine, QuantRange::INT8);
        let i8s = spec(QInt8, PerTensorSymmetric, QuantRange::INT8);
        let u8s = spec(QUInt8, PerTensorSymmetric, QuantRange::UINT8);
        let u4s = spec(QUInt8, PerTensorSymmetric, QuantRange::UINT4);
        let x = [-1.0f32, 2.0];
        let (s, z) = obs(&x, &u8a);
        assert_eq!((s, z), (3.0f32 / 255.0, 85));
        assert!((s - 0.01176471).abs() < 1e-8);
        assert_eq!(obs(&x, &i8a), (3.0f32 / 255.0, -43));
        let (s, z) = obs(&x, &i8s);
        assert_eq!((s, z), (2.0f32 / 127.5, 0));
        assert!((s - 0.01568628).abs() < 1e-8);
        assert_eq!(obs(&x, &u8s), (2.0f32 / 127.5, 128));
        // PyTorch's has_customized_qrange: an explicit [0, 255] gives the midpoint, 127.
        let u8s_explicit = u8s.with_customized_range(true).unwrap();
        assert_eq!(obs(&x, &u8s_explicit), (2.0f32 / 127.5, 127));
        assert!(u4s.with_customized_range(false).is_err());
        let e = ObserverSpec::new(QUInt8, PerTensorAffine, QuantRange::new(1, 9).unwrap(), 0)
            .unwrap_err();
        assert!(e.to_string().contains("must include 0"), "{e}");
        let e = ObserverSpec::new(QInt8, PerTensorAffine, QuantRange::new(0, 0).unwrap(), 0)
            .unwrap_err();
        assert!(e.to_string().contains("quant_min < quant_max"), "{e}");
        let (s, z) = obs(&x, &u4s);
        assert_eq!(z, 7);
        assert!((s - 0.26666668).abs() < 1e-8);
        // All zeros: scale eps; zp = qmin - round(0 / eps), so -128 for affine qint8
        // (PyTorch gives the same; "zp 0" holds for quint8 and symmetric schemes).
        assert_eq!(obs(&[0.0; 4], &i8a), (f32::EPSILON, -128));
        assert_eq!(obs(&[0.0; 4], &i8s), (f32::EPSILON, 0));
        assert_eq!(obs(&[0.0; 4], &u8a), (f32::EPSILON, 0));
        assert_eq!(obs(&[5.0; 3], &u8a), (5.0f32 / 255.0, 0));
        assert_eq!(obs(&[-5.0; 3], &u8a), (5.0f32 / 255.0, 255));
        // round(-2.5) = -2 (half to even) gives zp 2.
        let x = [-2.5f32 / 255.0, 1.0 - 2.5f32 / 255.0];
        assert_eq!(obs(&x, &u8a).1, 2);
    }

    #[test]
    fn empty_and_nan() {
        let s = spec(QDtype::QUInt8, QScheme::PerTensorAffine, QuantRange::UINT8);
        assert_eq!(obs(&[], &s), (1.0, 0));
        let (sc, z) = obs(&[1.0, f32::NAN, -1.0], &s);
        assert!(sc.is_nan());
        assert_eq!(z, 0);
        let s = spec(QDtype::QInt8, QScheme::PerTensorSymmetric, QuantRange::INT8);
        assert!(obs(&[f32::NAN], &s).0.is_nan());
        assert_eq!(obs(&[f32::INFINITY], &s).0, f32::INFINITY);
        assert_eq!(
            min_max(&arr1(&[]).into_dyn()),
            (f32::INFINITY, f32::NEG_INFINITY)
        );
    }

    #[test]
    fn per_channel() {
        let x = Array::from_shape_fn(IxDyn(&[2, 3, 2]), |d| {
            (d[0] as f32 - 0.5) * (d[1] as f32 + 1.0) + d[2] as f32
        });
        let (mn, mx) = min_max_per_channel(&x, 1).unwrap();
        for c in 0..3 {
            let lane = x.index_axis(ndarray::Axis(1), c);
            let lo = lane.iter().copied().fold(f32::INFINITY, f32::min);
            let hi = lane.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            assert_eq!((mn[c], mx[c]), (lo, hi));
        }
        // Non-standard layout gives the same answer.
        let xr: ArrayD<f32> = x.clone().reversed_axes();
        assert_eq!(
            min_max_per_channel(&xr, 1).unwrap(),
            (mn.clone(), mx.clone())
        );
        let s = ObserverSpec::new(
            QDtype::QInt8,
            QScheme::PerChannelSymmetric,
            QuantRange::INT8,
            1,
        )
        .unwrap();
        let qp = observe_qparams(&x, &s).unwrap();
        assert_eq!(qp.axis, Some(1));
        for c in 0..3 {
            let (sc, z) = qparams_one(mn[c], mx[c], &s);
            assert_eq!((qp.scale[c], qp.zero_point[c]), (sc, z));
            assert_eq!(z, 0);
        }
        qp.validate(x.shape(), s.range).unwrap();
        // A negative axis counts from the end: -2 of a rank-3 tensor is axis 1.
        let neg = ObserverSpec { axis: -2, ..s };
        assert_eq!(observe_qparams(&x, &neg).unwrap(), qp);
        let mut o = PerChannelMinMaxObserver::new(neg).unwrap();
        o.observe(&x).unwrap();
        assert_eq!(o.qparams(), qp);
        assert_eq!(o.spec().axis, 1);
        // NaN in one channel only.
        let mut y = x.clone();
        y[[1, 2, 0]] = f32::NAN;
        let (mn2, _) = min_max_per_channel(&y, 1).unwrap();
        assert!(mn2[2].is_nan() && !mn2[0].is_nan() && !mn2[1].is_nan());
    }

    #[test]
    fn error_axis_out_of_range() {
        let s = ObserverSpec::new(
            QDtype::QInt8,
            QScheme::PerChannelAffine,
            QuantRange::INT8,
            3,
        )
        .unwrap();
        let e = observe_qparams(&ArrayD::zeros(IxDyn(&[2, 2])), &s).unwrap_err();
        assert!(matches!(e, Error::AxisOutOfRange { axis: 3, rank: 2 }));
        let mut neg = s;
        neg.axis = -3;
        let e2 = observe_qparams(&ArrayD::zeros(IxDyn(&[2, 2])), &neg).unwrap_err();
        assert_eq!(
            e2.to_string(),
            "axis -3 is out of range for a tensor of rank 2"
        );
        assert_eq!(
            e.to_string(),
            "axis 3 is out of range for a tensor of rank 2"
        );
    }

    #[test]
    fn error_invalid_range() {
        let mut s = spec(QDtype::QInt8, QScheme::PerTensorAffine, QuantRange::INT8);
        s.range = QuantRange {
            quant_min: 3,
            quant_max: -3,
        };
        let e = observe_qparams(&arr1(&[1.0f32]).into_dyn(), &s).unwrap_err();
        assert_eq!(
            e.to_string(),
            "quant_min (3) must not be greater than quant_max (-3)"
        );
    }

    #[test]
    fn stateful_observers() {
        let s = spec(QDtype::QUInt8, QScheme::PerTensorAffine, QuantRange::UINT8);
        let mut o = MinMaxObserver::new(s).unwrap();
        assert_eq!(o.qparams(), QParams::per_tensor(1.0, 0));
        o.observe(&arr1(&[-1.0f32, 0.5]).into_dyn()).unwrap();
        o.observe(&arr1(&[0.0f32, 2.0]).into_dyn()).unwrap();
        o.observe(&arr1(&[]).into_dyn()).unwrap();
        assert_eq!((o.min_val(), o.max_val()), (&[-1.0f32][..], &[2.0f32][..]));
        assert_eq!(o.qparams(), QParams::per_tensor(3.0 / 255.0, 85));

        let mut m = MovingAverageMinMaxObserver::new(s).unwrap();
        m.observe(&arr1(&[-1.0f32, 1.0]).into_dyn()).unwrap();
        assert_eq!(m.min_val(), &[-1.0]);
        m.observe(&arr1(&[-3.0f32, 1.0]).into_dyn()).unwrap();
        assert_eq!(m.min_val(), &[-1.02f32]);
        assert_eq!(m.max_val(), &[1.0]);

        let ps = ObserverSpec::new(
            QDtype::QInt8,
            QScheme::PerChannelSymmetric,
            QuantRange::INT8,
            0,
        )
        .unwrap();
        assert!(MinMaxObserver::new(ps).is_err());
        assert!(PerChannelMinMaxObserver::new(s).is_err());
        assert!(MovingAverageMinMaxObserver::with_averaging_constant(s, 1.5).is_err());
        let mut p = PerChannelMinMaxObserver::new(ps).unwrap();
        assert_eq!(p.qparams().scale, vec![1.0]);
        let a = ndarray::arr2(&[[1.0f32, -2.0], [3.0, 4.0]]).into_dyn();
        let b = ndarray::arr2(&[[-5.0f32, 0.0], [1.0, 1.0]]).into_dyn();
        p.observe(&a).unwrap();
        p.observe(&b).unwrap();
        assert_eq!(p.min_val(), &[-5.0, 1.0]);
        assert_eq!(p.max_val(), &[1.0, 4.0]);
        let e = p.observe(&ArrayD::zeros(IxDyn(&[3, 2]))).unwrap_err();
        assert!(matches!(e, Error::ShapeMismatch { .. }));
        let mut q =
            MovingAveragePerChannelMinMaxObserver::with_averaging_constant(ps, 0.5).unwrap();
        q.observe(&a).unwrap();
        q.observe(&b).unwrap();
        assert_eq!(q.min_val(), &[-3.5, 2.0]);
        assert_eq!(q.max_val(), &[0.5, 2.5]);
        assert_eq!(q.qparams().zero_point, vec![0, 0]);
    }
}
