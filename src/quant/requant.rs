//! Integer requantization: the fixed-point arithmetic deployed int8 kernels use to map an i32
//! accumulator back to 8-bit codes, exactly as gemmlowp and TensorFlow Lite define it
//! (`QuantizeMultiplier`, `SaturatingRoundingDoublingHighMul`, `RoundingDivideByPOT`,
//! `MultiplyByQuantizedMultiplier`). Plain data and scalar integer functions: the CPU
//! reference ([`crate::reference::int8`]) and the WGSL kernels (`shaders/lib/requant.wgsl`)
//! both implement these, bit for bit.
//!
//! A real multiplier `M > 0` is stored as `M ≈ multiplier · 2^(shift − 31)` with
//! `multiplier ∈ [2^30, 2^31)` (a Q0.31 value in `[0.5, 1)`) and `shift ∈ [−31, 30]`.

use super::QDtype;
use crate::error::{Error, Result};

/// A real multiplier in gemmlowp's fixed-point form: `multiplier · 2^(shift − 31)`.
///
/// Built by [`FixedPointMultiplier::from_real`] (TFLite's `QuantizeMultiplier`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct FixedPointMultiplier {
    /// Q0.31 mantissa in `[2^30, 2^31)`, or 0 for a zero multiplier.
    pub multiplier: i32,
    /// Power-of-two exponent: positive shifts left before the high multiply, negative shifts
    /// right (rounding) after it. In `[−31, 30]`.
    pub shift: i32,
}

impl FixedPointMultiplier {
    /// Checks what [`FixedPointMultiplier::apply`] needs (a loaded model's multipliers come
    /// from a file): a non-negative multiplier and a shift in `[−31, 30]`.
    ///
    /// Errors: [`Error::InvalidArgument`] naming `what`.
    pub fn validate(self, what: &str) -> Result<()> {
        if !(-31..=30).contains(&self.shift) || self.multiplier < 0 {
            return Err(Error::invalid(format!(
                "{what} has multiplier {} and shift {}; expected a non-negative multiplier and \
                 shift in [-31, 30]",
                self.multiplier, self.shift
            )));
        }
        Ok(())
    }

    /// TFLite's `QuantizeMultiplier(double)`: splits `real = q · 2^shift` with `q ∈ [0.5, 1)`,
    /// rounds `q · 2^31` half away from zero (`std::round`), renormalizes when that rounds up
    /// to `2^31`, and flushes multipliers below `2^−32` to zero.
    ///
    /// Errors: [`Error::InvalidArgument`] when `real` is negative, NaN or infinite, or
    /// `≥ 2^30` (no deployed kernel scales an accumulator up that far).
    pub fn from_real(real: f64) -> Result<Self> {
        if !real.is_finite() || real < 0.0 {
            return Err(Error::invalid(format!(
                "requantization multiplier must be finite and non-negative, got {real}"
            )));
        }
        if real == 0.0 {
            return Ok(Self::default());
        }
        let (q, mut shift) = frexp(real);
        let mut q_fixed = (q * (1u64 << 31) as f64).round() as i64;
        if q_fixed == 1i64 << 31 {
            q_fixed /= 2;
            shift += 1;
        }
        if shift < -31 {
            return Ok(Self::default());
        }
        if shift > 30 {
            return Err(Error::invalid(format!(
                "requantization multiplier {real} is too large (>= 2^30)"
            )));
        }
        Ok(Self {
            multiplier: q_fixed as i32,
            shift,
        })
    }

    /// The real value this multiplier represents, `multiplier · 2^(shift − 31)`.
    pub fn to_real(self) -> f64 {
        self.multiplier as f64 * 2f64.powi(self.shift - 31)
    }

    /// TFLite's `MultiplyByQuantizedMultiplier(x, multiplier, shift)`:
    /// `RoundingDivideByPOT(SaturatingRoundingDoublingHighMul(x · 2^left, multiplier), right)`
    /// with `left = max(shift, 0)`, `right = max(−shift, 0)`. The left shift saturates to the
    /// i32 range (C++ leaves its overflow undefined; qfuse defines it, here and on the GPU).
    pub fn apply(self, x: i32) -> i32 {
        let left = self.shift.max(0);
        let right = (-self.shift).max(0);
        let shifted = ((x as i64) << left).clamp(i32::MIN as i64, i32::MAX as i64) as i32;
        rounding_divide_by_pot(
            saturating_rounding_doubling_high_mul(shifted, self.multiplier),
            right,
        )
    }
}

/// `frexp`: `x = m · 2^e` with `m ∈ [0.5, 1)`, for finite positive `x`.
fn frexp(x: f64) -> (f64, i32) {
    let bits = x.to_bits();
    let exp_bits = ((bits >> 52) & 0x7ff) as i32;
    if exp_bits == 0 {
        // Subnormal: scale up into the normal range first.
        let (m, e) = frexp(x * 2f64.powi(64));
        return (m, e - 64);
    }
    let e = exp_bits - 1022;
    let m = f64::from_bits((bits & !(0x7ffu64 << 52)) | (1022u64 << 52));
    (m, e)
}

/// gemmlowp's `SaturatingRoundingDoublingHighMul(a, b)`: the high 32 bits of `2·a·b`,
/// rounded (nudge `2^30` for a non-negative product, `1 − 2^30` otherwise, then division by
/// `2^31` truncating toward zero: ties round up, toward +∞, so `-1.5 → -1`), saturating the
/// one overflowing case `a = b = i32::MIN`.
pub fn saturating_rounding_doubling_high_mul(a: i32, b: i32) -> i32 {
    if a == i32::MIN && b == i32::MIN {
        return i32::MAX;
    }
    let ab = a as i64 * b as i64;
    let nudge: i64 = if ab >= 0 { 1 << 30 } else { 1 - (1 << 30) };
    ((ab + nudge) / (1i64 << 31)) as i32
}

/// gemmlowp's `RoundingDivideByPOT(x, exponent)`: `x / 2^exponent` rounded to nearest, ties
/// away from zero. `exponent ∈ [0, 31]`.
pub fn rounding_divide_by_pot(x: i32, exponent: i32) -> i32 {
    debug_assert!((0..=31).contains(&exponent));
    let mask: i32 = ((1i64 << exponent) - 1) as i32;
    let remainder = x & mask;
    let threshold = (mask >> 1) + i32::from(x < 0);
    (x >> exponent) + i32::from(remainder > threshold)
}

/// Which arithmetic maps an i32 accumulator to an output code.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum RequantMode {
    /// fp32 requantization, as PyTorch's fbgemm and XNNPACK int8 kernels do:
    /// `round_ties_even(f32(acc) · M_f32)`, with `f32(acc)` rounded to nearest even and the
    /// product correctly rounded. One rounding, ties to even: the arithmetic a fake-quant
    /// simulation also ends with. The default.
    #[default]
    Float,
    /// gemmlowp / TFLite fixed point: [`FixedPointMultiplier::apply`] (two roundings: the
    /// high multiply rounds ties up, the power-of-two divide ties away from zero).
    FixedPoint,
}

impl RequantMode {
    /// `float` or `fixed_point`.
    pub fn name(self) -> &'static str {
        match self {
            RequantMode::Float => "float",
            RequantMode::FixedPoint => "fixed_point",
        }
    }

    /// Parses [`RequantMode::name`]'s strings.
    ///
    /// Errors: [`Error::InvalidArgument`] for anything else.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "float" => Ok(RequantMode::Float),
            "fixed_point" => Ok(RequantMode::FixedPoint),
            other => Err(Error::invalid(format!(
                "unknown requantization mode `{other}` (expected float or fixed_point)"
            ))),
        }
    }
}

/// `round_ties_even(f32(acc) · scale)`: the [`RequantMode::Float`] step before the zero
/// point (`acc as f32` rounds to nearest even; the product is correctly rounded).
#[inline]
pub fn float_requantize(acc: i32, scale: f32) -> f32 {
    (acc as f32 * scale).round_ties_even()
}

/// How one output channel of an integer conv2d / linear maps its i32 accumulator
/// (bias included, input zero point already subtracted) to an 8-bit code:
/// `clamp(R[o](acc) + out_zero_point, clamp_min, clamp_max)`, where `R` is
/// [`float_requantize`] with `scales[o]` ([`RequantMode::Float`]) or
/// [`FixedPointMultiplier::apply`] with `multipliers[o]` ([`RequantMode::FixedPoint`]).
/// Both forms of each real multiplier `s_in · s_w[o] / s_out` are kept (see
/// [`Requant::new`]).
///
/// The clamp bounds carry the fused activation: ReLU raises `clamp_min` to the zero point,
/// ReLU6 lowers `clamp_max` to the code of 6 (see [`crate::ops::Activation::int8_bounds`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Requant {
    /// Which arithmetic the kernels use.
    pub mode: RequantMode,
    /// The multipliers in f32 (one, or one per output channel).
    pub scales: Vec<f32>,
    /// The same multipliers in fixed point.
    pub multipliers: Vec<FixedPointMultiplier>,
    /// Output zero point.
    pub out_zero_point: i32,
    /// Lowest output code (the quantization range's minimum, or higher for ReLU).
    pub clamp_min: i32,
    /// Highest output code (the quantization range's maximum, or lower for ReLU6).
    pub clamp_max: i32,
}

impl Requant {
    /// A requantization from real multipliers (one, or one per output channel; each
    /// `s_in · s_w[o] / s_out`, computed in f64 from the f32 scales): `scales` are them
    /// rounded to f32, `multipliers` their [`FixedPointMultiplier::from_real`] forms.
    ///
    /// Errors: multipliers that are negative, non-finite or `>= 2^30`; an empty list.
    pub fn new(
        real: &[f64],
        mode: RequantMode,
        out_zero_point: i32,
        (clamp_min, clamp_max): (i32, i32),
    ) -> Result<Self> {
        if real.is_empty() {
            return Err(Error::invalid(
                "a requantization needs at least one multiplier",
            ));
        }
        Ok(Self {
            mode,
            scales: real.iter().map(|&r| r as f32).collect(),
            multipliers: real
                .iter()
                .map(|&r| FixedPointMultiplier::from_real(r))
                .collect::<Result<_>>()?,
            out_zero_point,
            clamp_min,
            clamp_max,
        })
    }

    /// The multiplier of output channel `o` (the single one when there is one).
    pub fn multiplier(&self, o: usize) -> FixedPointMultiplier {
        if self.multipliers.len() == 1 {
            self.multipliers[0]
        } else {
            self.multipliers[o]
        }
    }

    /// The f32 multiplier of output channel `o` (the single one when there is one).
    pub fn scale(&self, o: usize) -> f32 {
        if self.scales.len() == 1 {
            self.scales[0]
        } else {
            self.scales[o]
        }
    }

    /// The requantized code of accumulator `acc` in channel `o`.
    pub fn apply(&self, o: usize, acc: i32) -> i32 {
        match self.mode {
            RequantMode::Float => {
                // Clamped in f32 (every bound is an integer, exact in f32), then converted.
                let v = float_requantize(acc, self.scale(o)) + self.out_zero_point as f32;
                v.clamp(self.clamp_min as f32, self.clamp_max as f32) as i32
            }
            RequantMode::FixedPoint => {
                let v = self
                    .multiplier(o)
                    .apply(acc)
                    .saturating_add(self.out_zero_point);
                v.clamp(self.clamp_min, self.clamp_max)
            }
        }
    }

    /// Checks the requantization against `channels` output channels: one multiplier or one
    /// per channel, `clamp_min <= out_zero_point`-independent bounds inside `[-128, 127]`
    /// (codes are stored as `i8`), `clamp_min <= clamp_max`, shifts in `[−31, 30]`.
    ///
    /// Errors: [`Error::ShapeMismatch`] for a wrong multiplier count,
    /// [`Error::InvalidArgument`] for bounds or shifts out of range.
    pub fn validate(&self, channels: usize) -> Result<()> {
        if self.scales.len() != self.multipliers.len() {
            return Err(Error::shape(
                "requantization f32 scales against fixed-point multipliers",
                &[self.multipliers.len()],
                &[self.scales.len()],
            ));
        }
        if let Some(s) = self.scales.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
            return Err(Error::invalid(format!(
                "requantization scale {s} must be finite and non-negative"
            )));
        }
        if self.multipliers.len() != 1 && self.multipliers.len() != channels {
            return Err(Error::shape(
                "requantization multipliers (one, or one per output channel)",
                &[channels],
                &[self.multipliers.len()],
            ));
        }
        if self.clamp_min > self.clamp_max || self.clamp_min < -128 || self.clamp_max > 127 {
            return Err(Error::invalid(format!(
                "requantization clamp [{}, {}] must be ordered and inside the int8 range [-128, 127]",
                self.clamp_min, self.clamp_max
            )));
        }
        if !(-128..=127).contains(&self.out_zero_point) {
            return Err(Error::invalid(format!(
                "output zero point {} is outside the int8 range [-128, 127]",
                self.out_zero_point
            )));
        }
        for (o, m) in self.multipliers.iter().enumerate() {
            m.validate(&format!("requantization multiplier {o}"))?;
        }
        Ok(())
    }
}

/// The quantized elementwise add of two 8-bit tensors into a third, with a fused clamp, in
/// one of two arithmetics ([`AddRequant::mode`]):
///
/// - [`RequantMode::Float`] (the default): onnxruntime's `QLinearAdd` as MLAS computes it on
///   x86-64 with AVX2 and FMA (`MlasQLinearAddKernelAvx2Helper`), bit for bit. On the codes
///   as the engine stores them (`x' = x + o`, `o` = 0 for int8 codes, 128 for uint8:
///   [`AddRequant::codes`]) with the f32 ratios `r_a = f32(s_a / s_out)`,
///   `r_b = f32(s_b / s_out)` and the f32 constant
///   `F = f32(z_out') − fma(r_a, f32(z_a'), f32(r_b · z_b'))` ([`AddRequant::float_offset`]):
///   `u = fma(f32(a'), r_a, fma(f32(b'), r_b, F))`, rounded half to even, minus `o`,
///   clamped (MLAS saturates to the code type; the clamp adds ReLU's bound, which onnxruntime
///   gets from the output zero point after dropping the Relu node). `fma` rounds once
///   (Rust's `f32::mul_add`); `F`'s inner `fma` is the contraction GCC makes of MLAS's
///   `ScaleRatio_AC * ZeroPointA + ScaleRatio_BC * ZeroPointB` (measured against
///   onnxruntime 1.32: 0 of 150 × 65,536 codes differ; without the contraction 13 do).
///   Because the stored codes enter f32 arithmetic, int8 and uint8 storage of the same
///   codes can round differently: the integer model follows the type its export uses.
/// - [`RequantMode::FixedPoint`]: TFLite's integer add (`tflite::reference_ops::Add` with its
///   `left_shift = 20` preparation): both inputs shifted left by [`AddRequant::LEFT_SHIFT`],
///   scaled to a common scale `2·max(s_a, s_b)` in fixed point, summed, then requantized
///   to the output.
///
/// Both forms are kept; [`AddRequant::apply`] is the spec the GPU kernel (`add_code` in
/// `shaders/lib/requant.wgsl`) matches bit for bit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AddRequant {
    /// Which arithmetic [`AddRequant::apply`] uses.
    pub mode: RequantMode,
    /// How the engine stores the codes the f32 form computes on: [`QDtype::QInt8`] (the
    /// codes as they are) or [`QDtype::QUInt8`] (codes and zero points + 128).
    pub codes: QDtype,
    /// Zero point of input `a`.
    pub a_zero_point: i32,
    /// Zero point of input `b`.
    pub b_zero_point: i32,
    /// `f32(s_a / s_out)` (f32 division), the f32 form's ratio for `a`.
    pub a_ratio: f32,
    /// `f32(s_b / s_out)`, the f32 form's ratio for `b`.
    pub b_ratio: f32,
    /// `s_a / (2·max(s_a, s_b))`.
    pub a_multiplier: FixedPointMultiplier,
    /// `s_b / (2·max(s_a, s_b))`.
    pub b_multiplier: FixedPointMultiplier,
    /// `2·max(s_a, s_b) / (2^LEFT_SHIFT · s_out)`.
    pub out_multiplier: FixedPointMultiplier,
    /// Output zero point.
    pub out_zero_point: i32,
    /// Lowest output code (ReLU raises it to the zero point).
    pub clamp_min: i32,
    /// Highest output code.
    pub clamp_max: i32,
}

impl AddRequant {
    /// TFLite's `left_shift` for 8-bit add.
    pub const LEFT_SHIFT: i32 = 20;

    /// The range of the f32 form's ratios `s_a / s_out`, `s_b / s_out`: `[2^-20, 2^20]`
    /// (the GPU's exact `fma` needs no subnormals and no overflow inside it).
    pub const RATIO_RANGE: (f32, f32) = (1.0 / 1_048_576.0, 1_048_576.0);

    /// Prepares an add of `a` (`a_scale`, `a_zp`) and `b` into an output with `out_scale`,
    /// `out_zp`, clamped to `bounds` (see [`crate::ops::Activation::int8_bounds`]), in
    /// `mode`, on codes stored as `codes`: both forms, the f32 ratios and TFLite's
    /// `PrepareGeneralSubOp` multipliers.
    ///
    /// Errors: [`Error::InvalidScale`] for a scale that is not positive and finite;
    /// [`Error::InvalidArgument`] for a ratio outside [`AddRequant::RATIO_RANGE`] or a
    /// multiplier TFLite's form cannot hold.
    pub fn new(
        (a_scale, a_zp): (f32, i32),
        (b_scale, b_zp): (f32, i32),
        (out_scale, out_zp): (f32, i32),
        bounds: (i32, i32),
        mode: RequantMode,
        codes: QDtype,
    ) -> Result<Self> {
        for (i, s) in [a_scale, b_scale, out_scale].into_iter().enumerate() {
            if !(s.is_finite() && s > 0.0) {
                return Err(Error::InvalidScale {
                    scale: s,
                    channel: i,
                });
            }
        }
        let twice_max = 2.0 * (a_scale.max(b_scale) as f64);
        let add = Self {
            mode,
            codes,
            a_zero_point: a_zp,
            b_zero_point: b_zp,
            a_ratio: a_scale / out_scale,
            b_ratio: b_scale / out_scale,
            a_multiplier: FixedPointMultiplier::from_real(a_scale as f64 / twice_max)?,
            b_multiplier: FixedPointMultiplier::from_real(b_scale as f64 / twice_max)?,
            out_multiplier: FixedPointMultiplier::from_real(
                twice_max / ((1i64 << Self::LEFT_SHIFT) as f64 * out_scale as f64),
            )?,
            out_zero_point: out_zp,
            clamp_min: bounds.0,
            clamp_max: bounds.1,
        };
        add.check_ratios()?;
        Ok(add)
    }

    /// What the f32 form adds to the stored codes: 0 for int8 storage, 128 for uint8.
    pub fn code_offset(&self) -> i32 {
        match self.codes {
            QDtype::QInt8 => 0,
            QDtype::QUInt8 => 128,
        }
    }

    /// The f32 form's constant `F = f32(z_out') − fma(r_a, f32(z_a'), f32(r_b · z_b'))`, the
    /// zero points as stored (`z' = z + o`), as MLAS computes it once per call.
    pub fn float_offset(&self) -> f32 {
        let o = self.code_offset();
        let (za, zb, zc) = (
            (self.a_zero_point + o) as f32,
            (self.b_zero_point + o) as f32,
            (self.out_zero_point + o) as f32,
        );
        zc - self.a_ratio.mul_add(za, self.b_ratio * zb)
    }

    /// The output code of codes `a` and `b` (each in `[-128, 127]`).
    pub fn apply(&self, a: i32, b: i32) -> i32 {
        match self.mode {
            RequantMode::Float => self.apply_float(a, b, self.float_offset()),
            RequantMode::FixedPoint => {
                let sa = (a - self.a_zero_point) << Self::LEFT_SHIFT;
                let sb = (b - self.b_zero_point) << Self::LEFT_SHIFT;
                let ra = self.a_multiplier.apply(sa);
                let rb = self.b_multiplier.apply(sb);
                let out = self
                    .out_multiplier
                    .apply(ra.saturating_add(rb))
                    .saturating_add(self.out_zero_point);
                out.clamp(self.clamp_min, self.clamp_max)
            }
        }
    }

    /// [`AddRequant::apply`] in [`RequantMode::Float`] with `offset` =
    /// [`AddRequant::float_offset`] (computed once per tensor by the caller).
    pub fn apply_float(&self, a: i32, b: i32, offset: f32) -> i32 {
        let o = self.code_offset();
        let t = ((b + o) as f32).mul_add(self.b_ratio, offset);
        let u = ((a + o) as f32).mul_add(self.a_ratio, t);
        // |u| < 2^29 (ratios <= 2^20, stored codes < 2^8): the rounding is exact; the
        // clamp bounds are integers, exact in f32.
        (u.round_ties_even() - o as f32).clamp(self.clamp_min as f32, self.clamp_max as f32) as i32
    }

    fn check_ratios(&self) -> Result<()> {
        let (lo, hi) = Self::RATIO_RANGE;
        for (what, r) in [("a", self.a_ratio), ("b", self.b_ratio)] {
            if !(lo..=hi).contains(&r) {
                return Err(Error::invalid(format!(
                    "quantized add {what} scale ratio {r} (input scale / output scale) is outside [2^-20, 2^20]"
                )));
            }
        }
        Ok(())
    }

    /// Checks zero points and bounds against the int8 code range, the f32 ratios against
    /// [`AddRequant::RATIO_RANGE`] and the three fixed-point multipliers
    /// ([`FixedPointMultiplier::validate`]): what both forms need, as CPU and GPU run them.
    ///
    /// Errors: [`Error::InvalidArgument`] naming the value out of range.
    pub fn validate(&self) -> Result<()> {
        for (what, m) in [
            ("quantized add a multiplier", self.a_multiplier),
            ("quantized add b multiplier", self.b_multiplier),
            ("quantized add output multiplier", self.out_multiplier),
        ] {
            m.validate(what)?;
        }
        self.check_ratios()?;
        for (what, v) in [
            ("a zero point", self.a_zero_point),
            ("b zero point", self.b_zero_point),
            ("output zero point", self.out_zero_point),
            ("clamp_min", self.clamp_min),
            ("clamp_max", self.clamp_max),
        ] {
            if !(-128..=127).contains(&v) {
                return Err(Error::invalid(format!(
                    "quantized add {what} {v} is outside the int8 range [-128, 127]"
                )));
            }
        }
        if self.clamp_min > self.clamp_max {
            return Err(Error::invalid(format!(
                "quantized add clamp [{}, {}] is not ordered",
                self.clamp_min, self.clamp_max
            )));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by fuzzing `IntModel::from_bytes`: a loaded add whose multiplier shift is outside
    /// `[−31, 30]` reached `rounding_divide_by_pot`'s exponent assertion. `validate` refuses it.
    #[test]
    fn add_multipliers_out_of_range_are_refused() {
        let ok = AddRequant::new(
            (0.5, 0),
            (0.25, 1),
            (0.75, -2),
            (-128, 127),
            RequantMode::FixedPoint,
            QDtype::QInt8,
        )
        .unwrap();
        ok.validate().unwrap();
        for shift in [31, -32, 40] {
            let mut bad = ok;
            bad.out_multiplier.shift = shift;
            let e = bad.validate().unwrap_err().to_string();
            assert!(e.contains("quantized add output multiplier"), "{e}");
            assert!(e.contains(&format!("shift {shift}")), "{e}");
        }
        let mut bad = ok;
        bad.a_multiplier.multiplier = -1;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("a multiplier"));
    }

    #[test]
    fn quantize_multiplier_matches_tflite() {
        // QuantizeMultiplier(0.5) = (2^30, 0); (1.0) = (2^30, 1); (0.25) = (2^30, -1).
        let m = FixedPointMultiplier::from_real(0.5).unwrap();
        assert_eq!((m.multiplier, m.shift), (1 << 30, 0));
        let m = FixedPointMultiplier::from_real(1.0).unwrap();
        assert_eq!((m.multiplier, m.shift), (1 << 30, 1));
        let m = FixedPointMultiplier::from_real(0.25).unwrap();
        assert_eq!((m.multiplier, m.shift), (1 << 30, -1));
        // A value just below 1 that rounds up to 2^31 renormalizes.
        let m = FixedPointMultiplier::from_real(1.0 - 1e-12).unwrap();
        assert_eq!((m.multiplier, m.shift), (1 << 30, 1));
        let m = FixedPointMultiplier::from_real(0.0).unwrap();
        assert_eq!((m.multiplier, m.shift), (0, 0));
        // Tiny multipliers flush to zero.
        assert_eq!(
            FixedPointMultiplier::from_real(1e-12).unwrap().multiplier,
            0
        );
        let m = FixedPointMultiplier::from_real(0.0123).unwrap();
        assert!((m.to_real() - 0.0123).abs() < 1e-11);
    }

    #[test]
    fn bad_multipliers_are_errors() {
        for r in [-1.0, f64::NAN, f64::INFINITY, 2f64.powi(31)] {
            assert!(FixedPointMultiplier::from_real(r).is_err(), "{r}");
        }
    }

    #[test]
    fn high_mul_and_pot_follow_gemmlowp() {
        assert_eq!(
            saturating_rounding_doubling_high_mul(i32::MIN, i32::MIN),
            i32::MAX
        );
        // 2·a·b / 2^32 with a = 2^30 (0.5 in Q31): halves, rounding ties up (toward +inf).
        let half = 1 << 30;
        assert_eq!(saturating_rounding_doubling_high_mul(3, half), 2);
        assert_eq!(saturating_rounding_doubling_high_mul(-3, half), -1);
        assert_eq!(saturating_rounding_doubling_high_mul(5, half), 3);
        assert_eq!(rounding_divide_by_pot(5, 1), 3);
        assert_eq!(rounding_divide_by_pot(-5, 1), -3);
        assert_eq!(rounding_divide_by_pot(-4, 1), -2);
        assert_eq!(rounding_divide_by_pot(7, 2), 2);
        assert_eq!(rounding_divide_by_pot(-7, 2), -2);
        assert_eq!(rounding_divide_by_pot(i32::MIN, 31), -1);
        assert_eq!(rounding_divide_by_pot(123, 0), 123);
    }

    #[test]
    fn apply_approximates_the_real_product() {
        // 0.49 · 1: the high multiply rounds 0.98 to 1, the divide by 2 rounds 0.5 up to 1.
        assert_eq!(FixedPointMultiplier::from_real(0.49).unwrap().apply(1), 1);
        for &real in &[0.0007, 0.013, 0.49, 0.75, 1.5, 3.2] {
            let m = FixedPointMultiplier::from_real(real).unwrap();
            for &x in &[0, 1, -1, 77, -77, 12345, -98765, 1 << 20] {
                let exact = x as f64 * real;
                let got = m.apply(x) as f64;
                // Two roundings (high multiply, then the power-of-two divide) can each add
                // half a unit: gemmlowp's double rounding stays within one unit.
                assert!((got - exact).abs() < 1.0 + 1e-6 * exact.abs(), "{real} {x}");
            }
        }
        // The left shift saturates instead of overflowing: 1024 = 0.5 · 2^11, so i32::MAX
        // shifts to i32::MAX, then halves (rounded).
        let m = FixedPointMultiplier::from_real(1024.0).unwrap();
        assert_eq!(m.apply(i32::MAX), 1 << 30);
        assert_eq!(m.apply(i32::MIN), -(1 << 30));
    }

    #[test]
    fn requant_validation() {
        let ok = Requant::new(&[0.01; 3], RequantMode::FixedPoint, 0, (-128, 127)).unwrap();
        ok.validate(3).unwrap();
        assert!(matches!(ok.validate(4), Err(Error::ShapeMismatch { .. })));
        let mut bad = ok.clone();
        bad.clamp_min = 5;
        bad.clamp_max = 4;
        assert!(bad.validate(3).is_err());
        let mut bad = ok.clone();
        bad.out_zero_point = 200;
        assert!(bad.validate(3).is_err());
        let mut bad = ok.clone();
        bad.multipliers[1].shift = 40;
        assert!(bad.validate(3).is_err());
        let mut bad = ok.clone();
        bad.scales.pop();
        assert!(bad.validate(3).is_err());
        let mut bad = ok;
        bad.scales[0] = f32::NAN;
        assert!(bad.validate(3).is_err());
        assert!(Requant::new(&[], RequantMode::Float, 0, (-128, 127)).is_err());
        assert!(Requant::new(&[-1.0], RequantMode::Float, 0, (-128, 127)).is_err());
    }

    #[test]
    fn float_mode_rounds_once_ties_to_even() {
        let rq = Requant::new(&[0.5], RequantMode::Float, 0, (-128, 127)).unwrap();
        // 0.5 · {1, 3, 5, -1, -3} = ties: to even.
        assert_eq!([1, 3, 5, -1, -3].map(|a| rq.apply(0, a)), [0, 2, 2, 0, -2]);
        let fx = Requant {
            mode: RequantMode::FixedPoint,
            ..rq.clone()
        };
        // The fixed-point high multiply rounds ties up (toward +inf): -0.5 → 0, -1.5 → -1.
        assert_eq!([1, 3, 5, -1, -3].map(|a| fx.apply(0, a)), [1, 2, 3, 0, -1]);
        // Above 2^24 the accumulator itself rounds to f32 (nearest even) first.
        let one = Requant::new(&[1.0], RequantMode::Float, 0, (-128, 127)).unwrap();
        assert_eq!(one.apply(0, (1 << 24) + 1), 127);
        assert_eq!(float_requantize((1 << 24) + 1, 1.0), (1 << 24) as f32);
        assert_eq!(
            RequantMode::parse("fixed_point").unwrap(),
            RequantMode::FixedPoint
        );
        assert!(RequantMode::parse("fp").is_err());
    }

    #[test]
    fn quantized_add_matches_real_sum() {
        for mode in [RequantMode::Float, RequantMode::FixedPoint] {
            for codes in [QDtype::QInt8, QDtype::QUInt8] {
                let add =
                    AddRequant::new((0.05, 3), (0.02, -7), (0.06, 1), (-128, 127), mode, codes)
                        .unwrap();
                for a in [-128, -5, 0, 3, 90, 127] {
                    for b in [-128, -7, 0, 40, 127] {
                        let real = (a - 3) as f64 * 0.05 + (b + 7) as f64 * 0.02;
                        let want = ((real / 0.06).round() as i32 + 1).clamp(-128, 127);
                        let got = add.apply(a, b);
                        assert!((got - want).abs() <= 1, "{a} {b}: {got} vs {want}");
                    }
                }
            }
        }
        let new = |s: (f32, f32, f32)| {
            AddRequant::new(
                (s.0, 0),
                (s.1, 0),
                (s.2, 0),
                (-128, 127),
                RequantMode::Float,
                QDtype::QInt8,
            )
        };
        assert!(new((0.0, 1.0, 1.0)).is_err());
        let e = new((1.0, 1.0, 1e-7)).unwrap_err().to_string();
        assert!(e.contains("scale ratio"), "{e}");
        let mut bad = new((1.0, 1.0, 1.0)).unwrap();
        bad.b_ratio = f32::NAN;
        assert!(bad
            .validate()
            .unwrap_err()
            .to_string()
            .contains("b scale ratio"));
    }

    /// The f32 form is MLAS's AVX2 kernel: ties at exact halves round to even after the
    /// zero points were folded into `F`, and the stored code type changes the roundings.
    #[test]
    fn float_add_follows_mlas() {
        // r_a = r_b = 1, F = z_out' - (z_a' + z_b'): integers, exact; (a + b) / 1 exact.
        let add = AddRequant::new(
            (0.5, 10),
            (0.5, -20),
            (0.5, 3),
            (-128, 127),
            RequantMode::Float,
            QDtype::QUInt8,
        )
        .unwrap();
        assert_eq!(add.float_offset(), 131.0 - (138.0 + 108.0));
        assert_eq!(add.apply(12, -21), 3 + 2 - 1);
        assert_eq!(add.apply(127, 127), 127);
        assert_eq!(add.apply(-128, -128), -128);
        // r = 0.75: (a - z_a) * 0.75 = 1.5 rounds to 2, 2.5 to 2 (ties to even).
        let add = AddRequant::new(
            (0.75, 0),
            (1.0, 0),
            (1.0, 0),
            (-128, 127),
            RequantMode::Float,
            QDtype::QInt8,
        )
        .unwrap();
        assert_eq!(add.apply(2, 0), 2);
        assert_eq!(add.apply(-2, 0), -2);
        assert_eq!(add.apply(2, 1), 2);
        assert_eq!(add.apply(6, -1), 4);
    }
}
