//! What a quantization is: integer ranges, schemes, and quantization parameters.
//! Plain data with validation; the arithmetic lives in [`crate::reference`] (CPU) and
//! [`crate::kernels`] (GPU).

use crate::error::{Error, Result};

pub mod requant;
pub use requant::{AddRequant, FixedPointMultiplier, Requant, RequantMode};

/// The integer range `[quant_min, quant_max]` that fake quantization clamps to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuantRange {
    /// Lowest representable integer.
    pub quant_min: i32,
    /// Highest representable integer.
    pub quant_max: i32,
}

impl QuantRange {
    /// A validated range: `quant_min <= quant_max`, else [`Error::InvalidQuantRange`]. As in
    /// PyTorch's fake quantization, a single-value range (`quant_min == quant_max`) is
    /// accepted: every value then quantizes to that one code. Observers need more
    /// ([`ObserverSpec::validate`]: `quant_min < quant_max`).
    pub fn new(quant_min: i32, quant_max: i32) -> Result<Self> {
        if quant_min > quant_max {
            return Err(Error::InvalidQuantRange {
                quant_min,
                quant_max,
            });
        }
        Ok(Self {
            quant_min,
            quant_max,
        })
    }
    /// Signed 8-bit, `[-128, 127]`.
    pub const INT8: Self = Self {
        quant_min: -128,
        quant_max: 127,
    };
    /// Unsigned 8-bit, `[0, 255]`.
    pub const UINT8: Self = Self {
        quant_min: 0,
        quant_max: 255,
    };
    /// Signed 4-bit, `[-8, 7]`.
    pub const INT4: Self = Self {
        quant_min: -8,
        quant_max: 7,
    };
    /// Unsigned 4-bit, `[0, 15]`.
    pub const UINT4: Self = Self {
        quant_min: 0,
        quant_max: 15,
    };

    /// Checks the range again (for values built with a struct literal).
    pub fn validate(&self) -> Result<()> {
        Self::new(self.quant_min, self.quant_max).map(|_| ())
    }

    /// Checks that the range is valid and fits the 8-bit signed codes integer tensors hold
    /// (`[-128, 127]`): the one check of the integer ops, CPU and GPU.
    pub fn check_int8_codes(&self) -> Result<()> {
        self.validate()?;
        if self.quant_min < -128 || self.quant_max > 127 {
            return Err(Error::invalid(format!(
                "integer tensors hold 8-bit signed codes; range [{}, {}] does not fit [-128, 127]",
                self.quant_min, self.quant_max
            )));
        }
        Ok(())
    }
}

/// PyTorch's quantized dtypes that observers know (`torch.qint8`, `torch.quint8`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum QDtype {
    /// `torch.qint8`: signed.
    #[default]
    QInt8,
    /// `torch.quint8`: unsigned.
    QUInt8,
}

impl QDtype {
    /// Parses `qint8` / `quint8` (also `int8` / `uint8`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "qint8" | "int8" => Ok(Self::QInt8),
            "quint8" | "uint8" => Ok(Self::QUInt8),
            other => Err(Error::invalid(format!(
                "unknown dtype `{other}` (expected qint8 or quint8)"
            ))),
        }
    }
}

/// PyTorch's `qscheme`s for observers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QScheme {
    /// `torch.per_tensor_affine`.
    PerTensorAffine,
    /// `torch.per_tensor_symmetric`.
    PerTensorSymmetric,
    /// `torch.per_channel_affine`.
    PerChannelAffine,
    /// `torch.per_channel_symmetric`.
    PerChannelSymmetric,
}

impl QScheme {
    /// Parses PyTorch's names (`per_tensor_affine`, ...).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "per_tensor_affine" => Ok(Self::PerTensorAffine),
            "per_tensor_symmetric" => Ok(Self::PerTensorSymmetric),
            "per_channel_affine" => Ok(Self::PerChannelAffine),
            "per_channel_symmetric" => Ok(Self::PerChannelSymmetric),
            other => Err(Error::invalid(format!("unknown qscheme `{other}`"))),
        }
    }
    /// Symmetric schemes.
    pub fn is_symmetric(self) -> bool {
        matches!(self, Self::PerTensorSymmetric | Self::PerChannelSymmetric)
    }
    /// Per-channel schemes.
    pub fn is_per_channel(self) -> bool {
        matches!(self, Self::PerChannelAffine | Self::PerChannelSymmetric)
    }
}

/// The one check of a code table (256 entries, one per int8 code), shared by the reference
/// (`reference::int8::lookup_int8`) and the GPU kernel.
pub fn check_table(table: &[i8]) -> Result<()> {
    if table.len() != 256 {
        return Err(Error::invalid(format!(
            "a code table has 256 entries (one per int8 code), got {}",
            table.len()
        )));
    }
    Ok(())
}

/// PyTorch's dim wrapping: `axis` in `-rank..rank`, a negative axis counting from the end
/// (`-1` is the last dim). The one place every observer and kernel resolves a channel axis.
///
/// Errors: [`Error::AxisOutOfRange`] outside `-rank..rank`.
pub fn resolve_axis(axis: isize, rank: usize) -> Result<usize> {
    let err = || Error::AxisOutOfRange { axis, rank };
    let r = isize::try_from(rank).map_err(|_| err())?;
    let a = if axis < 0 { axis + r } else { axis };
    if (0..r).contains(&a) {
        Ok(a as usize)
    } else {
        Err(err())
    }
}

impl QDtype {
    /// The range a PyTorch observer of this dtype uses when no `quant_min` / `quant_max` is
    /// given (`calculate_qmin_qmax` without `reduce_range`): `[-128, 127]` or `[0, 255]`.
    pub fn default_range(self) -> QuantRange {
        match self {
            Self::QInt8 => QuantRange::INT8,
            Self::QUInt8 => QuantRange::UINT8,
        }
    }
}

/// How an observer turns min/max into quantization parameters
/// (`MinMaxObserver` / `PerChannelMinMaxObserver` settings).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ObserverSpec {
    /// Quantized dtype (decides the symmetric zero point of unsigned types).
    pub dtype: QDtype,
    /// Scheme.
    pub qscheme: QScheme,
    /// Integer range.
    pub range: QuantRange,
    /// Channel axis for per-channel schemes (`ch_axis`); negative counts from the end of the
    /// observed tensor's dims ([`resolve_axis`]), as in PyTorch.
    pub axis: isize,
    /// Lower clamp of the scale (`torch.finfo(torch.float32).eps` by default).
    pub eps: f32,
    /// Whether `range` was given explicitly (PyTorch's `has_customized_qrange`: the observer
    /// was built with `quant_min` and `quant_max`). It decides the symmetric zero point of
    /// `quint8`: `(quant_min + quant_max) // 2` when customized (127 for an explicit
    /// `[0, 255]`), 128 for the default range. A customized range must contain 0.
    pub customized_range: bool,
}

impl ObserverSpec {
    /// The zero point of symmetric schemes (`_calculate_qparams`): 0 for `qint8`; for
    /// `quint8` the down-rounded midpoint `(quant_min + quant_max) // 2` of a customized range
    /// ([`ObserverSpec::customized_range`], PyTorch's `has_customized_qrange`; 127 for an
    /// explicit `[0, 255]`), 128 for the default range. The one formula of the CPU and GPU
    /// observers.
    pub fn symmetric_zero_point(&self) -> i32 {
        match self.dtype {
            QDtype::QInt8 => 0,
            QDtype::QUInt8 if self.customized_range => {
                let sum = i64::from(self.range.quant_min) + i64::from(self.range.quant_max);
                sum.div_euclid(2) as i32
            }
            QDtype::QUInt8 => 128,
        }
    }

    /// A spec with PyTorch's default eps (`f32::EPSILON`), validated
    /// ([`ObserverSpec::validate`]). The range counts as customized
    /// ([`ObserverSpec::customized_range`]) when it differs from the dtype's default range, as
    /// for a PyTorch observer given `quant_min` / `quant_max` only when they differ from the
    /// defaults; [`ObserverSpec::with_customized_range`] says otherwise.
    pub fn new(dtype: QDtype, qscheme: QScheme, range: QuantRange, axis: isize) -> Result<Self> {
        let spec = Self {
            dtype,
            qscheme,
            range,
            axis,
            eps: f32::EPSILON,
            customized_range: range != dtype.default_range(),
        };
        spec.validate()?;
        Ok(spec)
    }

    /// This spec with [`ObserverSpec::customized_range`] set as given (a PyTorch observer
    /// built with explicit `quant_min` / `quant_max`: `true`), validated.
    pub fn with_customized_range(self, customized: bool) -> Result<Self> {
        let spec = Self {
            customized_range: customized,
            ..self
        };
        spec.validate()?;
        Ok(spec)
    }

    /// PyTorch's checks of an observer's range (`validate_qmin_qmax`): a valid range with
    /// `quant_min < quant_max`, and a customized range must contain 0.
    ///
    /// Errors: [`Error::InvalidQuantRange`] for `quant_min > quant_max`,
    /// [`Error::InvalidArgument`] for `quant_min == quant_max`, a customized range without 0,
    /// or a range other than the dtype's default that is not marked customized.
    pub fn validate(&self) -> Result<()> {
        let QuantRange {
            quant_min,
            quant_max,
        } = self.range;
        self.range.validate()?;
        if quant_min == quant_max {
            return Err(Error::invalid(format!(
                "an observer needs quant_min < quant_max, got quant_min = quant_max = {quant_min}"
            )));
        }
        if !self.customized_range && self.range != self.dtype.default_range() {
            return Err(Error::invalid(format!(
                "an observer range [{quant_min}, {quant_max}] other than the dtype's default \
                 is a customized range"
            )));
        }
        if self.customized_range && !(quant_min <= 0 && 0 <= quant_max) {
            return Err(Error::invalid(format!(
                "a user-specified observer range must include 0, got [{quant_min}, {quant_max}]"
            )));
        }
        Ok(())
    }

    /// The channel axis for a tensor of rank `rank` ([`resolve_axis`] of
    /// [`ObserverSpec::axis`]).
    ///
    /// Errors: [`Error::AxisOutOfRange`].
    pub fn channel_axis(&self, rank: usize) -> Result<usize> {
        resolve_axis(self.axis, rank)
    }

    /// This spec with its axis resolved against `rank` (non-negative) for a per-channel
    /// scheme; per-tensor specs are returned unchanged.
    ///
    /// Errors: [`Error::AxisOutOfRange`] for a per-channel scheme.
    pub fn for_rank(&self, rank: usize) -> Result<Self> {
        if !self.qscheme.is_per_channel() {
            return Ok(*self);
        }
        let axis = self.channel_axis(rank)?;
        Ok(Self {
            axis: axis as isize,
            ..*self
        })
    }
}

/// Quantization parameters: one `(scale, zero_point)` per tensor, or one per channel along
/// `axis`.
#[derive(Debug, Clone, PartialEq)]
pub struct QParams {
    /// Scales (length 1 for per-tensor).
    pub scale: Vec<f32>,
    /// Zero points, same length as `scale`.
    pub zero_point: Vec<i32>,
    /// `None`: per tensor; `Some(axis)`: per channel along `axis`.
    pub axis: Option<usize>,
}

impl QParams {
    /// Per-tensor parameters.
    pub fn per_tensor(scale: f32, zero_point: i32) -> Self {
        Self {
            scale: vec![scale],
            zero_point: vec![zero_point],
            axis: None,
        }
    }

    /// Per-channel parameters along `axis`; scale and zero-point lengths must agree.
    pub fn per_channel(scale: Vec<f32>, zero_point: Vec<i32>, axis: usize) -> Result<Self> {
        if scale.len() != zero_point.len() {
            return Err(Error::shape(
                "per-channel qparams (zero_point vs scale)",
                &[scale.len()],
                &[zero_point.len()],
            ));
        }
        Ok(Self {
            scale,
            zero_point,
            axis: Some(axis),
        })
    }

    /// Checks these parameters against a tensor shape and an integer range:
    /// range valid, scales positive and finite, zero points in range, axis in range and
    /// channel count equal to `shape[axis]`.
    pub fn validate(&self, shape: &[usize], range: QuantRange) -> Result<()> {
        range.validate()?;
        match self.axis {
            None => {
                if self.scale.len() != 1 || self.zero_point.len() != 1 {
                    return Err(Error::shape(
                        "per-tensor qparams",
                        &[1],
                        &[self.scale.len()],
                    ));
                }
            }
            Some(axis) => {
                if axis >= shape.len() {
                    return Err(Error::axis(axis, shape.len()));
                }
                if self.scale.len() != shape[axis] {
                    return Err(Error::shape(
                        format!("per-channel scale (axis {axis} of input {shape:?})"),
                        &[shape[axis]],
                        &[self.scale.len()],
                    ));
                }
                if self.zero_point.len() != shape[axis] {
                    return Err(Error::shape(
                        format!("per-channel zero_point (axis {axis} of input {shape:?})"),
                        &[shape[axis]],
                        &[self.zero_point.len()],
                    ));
                }
            }
        }
        for (channel, (&scale, &zp)) in self.scale.iter().zip(&self.zero_point).enumerate() {
            if !(scale.is_finite() && scale > 0.0) {
                return Err(Error::InvalidScale { scale, channel });
            }
            if zp < range.quant_min || zp > range.quant_max {
                return Err(Error::ZeroPointOutOfRange {
                    zero_point: zp,
                    channel,
                    quant_min: range.quant_min,
                    quant_max: range.quant_max,
                });
            }
        }
        Ok(())
    }

    /// Number of channels (1 for per-tensor).
    pub fn channels(&self) -> usize {
        self.scale.len()
    }
}
