// lib/requant.wgsl: requantization of i32 accumulators in WGSL, bit-exact with
// src/quant/requant.rs: gemmlowp / TFLite fixed point in 32-bit integers
// (FixedPointMultiplier::apply, Requant::apply in RequantMode::FixedPoint, AddRequant::apply)
// and the f32 forms (float_requantize, Requant::apply in RequantMode::Float; the quantized
// add's MLAS form, whose fused multiply-adds are computed in integer arithmetic, WGSL's own
// fma being allowed to round twice), whose i32 -> f32
// conversion is done in integer arithmetic (WGSL leaves the rounding of f32(i32) to the
// implementation) and whose out-of-range products saturate by sign without relying on inf. WGSL has no i64: the 32x32 -> 64-bit signed product of
// SaturatingRoundingDoublingHighMul is formed from 16-bit limbs of the magnitudes (u32
// arithmetic, which wraps by definition), and the nudge and the truncating division by 2^31
// are applied to the magnitude (see srdhm below). Every shift amount is < 32, no i32 operation
// relies on overflow except where wrapping is meant, and no float is converted.
//
// Bindings: none (functions only). Dispatch: none; it has no entry points.
// Used by: int8.wgsl and int8_conv.wgsl, which name it in `// requires:` lines; their launchers
// prepend it with concat!(include_str!(..)).

const RQ_I32_MIN: i32 = -2147483647 - 1;
const RQ_I32_MAX: i32 = 2147483647;

// |v| as u32 (|i32::MIN| = 2^31 is representable).
fn rq_abs_u32(v: i32) -> u32 {
    let u = bitcast<u32>(v);
    return select(u, 0u - u, v < 0);
}

// gemmlowp's SaturatingRoundingDoublingHighMul(a, b): high 32 bits of 2ab, rounded with
// nudge 2^30 (ab >= 0) or 1 - 2^30 (ab < 0), then divided by 2^31 truncating toward zero.
// For |ab| = m: ab >= 0 gives floor((m + 2^30) / 2^31); ab < 0 gives
// -floor((m + 2^30 - 1) / 2^31). m <= 2^62 - 2^31 (a = b = i32::MIN is handled first), so
// each quotient is <= 2^31 - 1.
fn srdhm(a: i32, b: i32) -> i32 {
    if (a == RQ_I32_MIN && b == RQ_I32_MIN) {
        return RQ_I32_MAX;
    }
    let ua = rq_abs_u32(a);
    let ub = rq_abs_u32(b);
    let a0 = ua & 0xffffu;
    let a1 = ua >> 16u;
    let b0 = ub & 0xffffu;
    let b1 = ub >> 16u;
    let p00 = a0 * b0;
    let p01 = a0 * b1;
    let p10 = a1 * b0;
    let p11 = a1 * b1;
    // m = hi * 2^32 + lo.
    let t = (p00 >> 16u) + (p01 & 0xffffu) + (p10 & 0xffffu);
    let lo = (p00 & 0xffffu) | (t << 16u);
    let hi = p11 + (p01 >> 16u) + (p10 >> 16u) + (t >> 16u);
    let negative = (a < 0) != (b < 0) && ua != 0u && ub != 0u;
    let nudge = select(0x40000000u, 0x3fffffffu, negative);
    let s = lo + nudge;
    let carry = select(0u, 1u, s < lo);
    // floor((m + nudge) / 2^31) = 2 * (hi + carry) + (s >> 31); hi + carry < 2^30.
    let q = ((hi + carry) << 1u) | (s >> 31u);
    let qi = bitcast<i32>(q);
    return select(qi, 0 - qi, negative);
}

// gemmlowp's RoundingDivideByPOT(x, exponent): x / 2^exponent rounded to nearest, ties away
// from zero. exponent in [0, 31].
fn rdbp(x: i32, exponent: u32) -> i32 {
    let e = min(exponent, 31u);
    let mask = bitcast<i32>((1u << e) - 1u);
    let remainder = x & mask;
    let threshold = (mask >> 1u) + select(0, 1, x < 0);
    return (x >> e) + select(0, 1, remainder > threshold);
}

// x * 2^left saturated to the i32 range (left in [0, 30]).
fn sat_shl(x: i32, left: u32) -> i32 {
    if (left == 0u) {
        return x;
    }
    let l = min(left, 31u);
    let shifted = bitcast<i32>(bitcast<u32>(x) << l);
    if ((shifted >> l) != x) {
        return select(RQ_I32_MAX, RQ_I32_MIN, x < 0);
    }
    return shifted;
}

// TFLite's MultiplyByQuantizedMultiplier with a saturating left shift
// (FixedPointMultiplier::apply): multiplier in [0, 2^31), shift in [-31, 30].
fn mbqm(x: i32, multiplier: i32, shift: i32) -> i32 {
    let left = u32(max(shift, 0));
    let right = u32(max(-shift, 0));
    return rdbp(srdhm(sat_shl(x, left), multiplier), right);
}

// i32 saturating addition (Rust's i32::saturating_add).
fn sat_add(a: i32, b: i32) -> i32 {
    let s = a + b;
    // Overflow iff a and b share a sign and s has the other one.
    if (a >= 0 && b >= 0 && s < 0) {
        return RQ_I32_MAX;
    }
    if (a < 0 && b < 0 && s >= 0) {
        return RQ_I32_MIN;
    }
    return s;
}

// Requant::apply for one channel: clamp(mbqm(acc) sat+ out_zp, lo, hi).
fn requant_code(acc: i32, multiplier: i32, shift: i32, out_zp: i32, lo: i32, hi: i32) -> i32 {
    return clamp(sat_add(mbqm(acc, multiplier, shift), out_zp), lo, hi);
}

// f32(v) rounded to nearest, ties to even, as Rust's `v as f32`, built from its bits.
fn i32_to_f32_rn(v: i32) -> f32 {
    let m = rq_abs_u32(v);
    if (m < 0x1000000u) {
        return f32(v);
    }
    // m >= 2^24: keep 24 significant bits, dropping sh in [1, 8].
    let top = 31u - countLeadingZeros(m);
    var sh = top - 23u;
    var mant = m >> sh;
    let rem = m & ((1u << sh) - 1u);
    let half = 1u << (sh - 1u);
    if (rem > half || (rem == half && (mant & 1u) == 1u)) {
        mant += 1u;
    }
    if (mant == 0x1000000u) {
        mant = mant >> 1u;
        sh += 1u;
    }
    let sign = select(0u, 0x80000000u, v < 0);
    return bitcast<f32>(sign | ((127u + 23u + sh) << 23u) | (mant & 0x7fffffu));
}

// Requant::apply in RequantMode::Float: clamp(round_ties_even(f32(acc) * scale) + f32(out_zp),
// lo, hi) in f32, then to i32. scale is finite and >= 0; a product of magnitude >= 2^24 (inf
// included) lies outside every int8 clamp once the zero point is added, so it saturates by
// sign without further float arithmetic.
fn float_requant_code(acc: i32, scale: f32, out_zp: i32, lo: i32, hi: i32) -> i32 {
    let p = i32_to_f32_rn(acc) * scale;
    let bits = bitcast<u32>(p);
    if ((bits & 0x7fffffffu) >= 0x4b800000u) {
        return select(hi, lo, (bits >> 31u) != 0u);
    }
    let v = round(p) + f32(out_zp);
    return i32(clamp(v, f32(lo), f32(hi)));
}

// AddRequant with its zero points, multipliers and f32 form, as the int8 add kernel reads it.
struct AddParams {
    a_zp: i32,
    b_zp: i32,
    a_mult: i32,
    a_shift: i32,
    b_mult: i32,
    b_shift: i32,
    out_mult: i32,
    out_shift: i32,
    out_zp: i32,
    lo: i32,
    hi: i32,
    float_mode: i32,
    code_offset: i32,
    a_ratio: f32,
    b_ratio: f32,
    float_offset: f32,
}

// TFLite's int8 add with left_shift 20 (AddRequant::apply in RequantMode::FixedPoint). Codes
// and zero points are in [-128, 127], so (a - a_zp) << 20 stays below 2^28 in magnitude.
fn add_code_fixed(a: i32, b: i32, p: AddParams) -> i32 {
    let sa = (a - p.a_zp) * 1048576;
    let sb = (b - p.b_zp) * 1048576;
    let ra = mbqm(sa, p.a_mult, p.a_shift);
    let rb = mbqm(sb, p.b_mult, p.b_shift);
    let out = sat_add(mbqm(sat_add(ra, rb), p.out_mult, p.out_shift), p.out_zp);
    return clamp(out, p.lo, p.hi);
}

// 64-bit unsigned values as vec2<u32>(hi, lo).
// x >> d (d >= 0), truncating.
fn rq_u64_shr(x: vec2<u32>, d: u32) -> vec2<u32> {
    if (d == 0u) {
        return x;
    }
    if (d < 32u) {
        return vec2<u32>(x.x >> d, (x.y >> d) | (x.x << (32u - d)));
    }
    if (d < 64u) {
        return vec2<u32>(0u, x.x >> (d - 32u));
    }
    return vec2<u32>(0u, 0u);
}

// Whether any of the low n bits of x is set (n >= 0).
fn rq_u64_low_set(x: vec2<u32>, n: u32) -> bool {
    if (n == 0u) {
        return false;
    }
    if (n < 32u) {
        return (x.y << (32u - n)) != 0u;
    }
    if (n == 32u) {
        return x.y != 0u;
    }
    if (n < 64u) {
        return x.y != 0u || (x.x << (64u - n)) != 0u;
    }
    return (x.x | x.y) != 0u;
}

// fma(x, y, z) rounded once to nearest even, as Rust's f32::mul_add, in integer arithmetic
// (WGSL's fma may round twice, and shader compilers may rewrite float expressions): x an
// integer with |x| < 2^8, y normal, z finite, the result and every operand inside the normal
// range (true for the add's operands under AddRequant::RATIO_RANGE). |x| * mantissa(y) < 2^32
// is exact in u32; both terms are normalized to bit 31, the larger placed at bit 61 of a
// 64-bit sum and the smaller shifted right with its lost bits kept as a sticky bit 0 (far
// below the rounding position: when the shift loses bits, the sum keeps >= 60 bits), then
// the sum is rounded to 24 bits, ties to even.
fn rq_fma_small(x: i32, y: f32, z: f32) -> f32 {
    let yb = bitcast<u32>(y);
    let zb = bitcast<u32>(z);
    let yexp = (yb >> 23u) & 0xffu;
    let zexp = (zb >> 23u) & 0xffu;
    var a_m = rq_abs_u32(x) * ((yb & 0x7fffffu) | select(0x800000u, 0u, yexp == 0u));
    var a_e = i32(max(yexp, 1u)) - 150;
    var a_neg = (x < 0) != ((yb >> 31u) != 0u);
    var b_m = (zb & 0x7fffffu) | select(0x800000u, 0u, zexp == 0u);
    var b_e = i32(max(zexp, 1u)) - 150;
    var b_neg = (zb >> 31u) != 0u;
    if (a_m == 0u) {
        return z;
    }
    let ca = countLeadingZeros(a_m);
    a_m = a_m << ca;
    a_e -= i32(ca);
    if (b_m == 0u) {
        b_e = a_e - 100;
    } else {
        let cb = countLeadingZeros(b_m);
        b_m = b_m << cb;
        b_e -= i32(cb);
    }
    if (b_e > a_e || (b_e == a_e && b_m > a_m)) {
        let m = a_m;
        a_m = b_m;
        b_m = m;
        let e = a_e;
        a_e = b_e;
        b_e = e;
        let n = a_neg;
        a_neg = b_neg;
        b_neg = n;
    }
    // Units of 2^(a_e - 30): big = a_m << 30, small = (b_m << 30) >> d with sticky bit.
    let d = u32(min(a_e - b_e, 64));
    let small_full = vec2<u32>(b_m >> 2u, b_m << 30u);
    var small = rq_u64_shr(small_full, d);
    if (rq_u64_low_set(small_full, d)) {
        small.y |= 1u;
    }
    let big = vec2<u32>(a_m >> 2u, a_m << 30u);
    var r: vec2<u32>;
    if (a_neg == b_neg) {
        let lo = big.y + small.y;
        r = vec2<u32>(big.x + small.x + select(0u, 1u, lo < big.y), lo);
    } else {
        // big >= small: ordered by exponent, then by mantissa when d = 0.
        r = vec2<u32>(big.x - small.x - select(0u, 1u, big.y < small.y), big.y - small.y);
    }
    if ((r.x | r.y) == 0u) {
        return 0.0;
    }
    let top = select(63u - countLeadingZeros(r.x), 31u - countLeadingZeros(r.y), r.x == 0u);
    var mant: u32;
    var k: i32;
    if (top <= 23u) {
        mant = r.y << (23u - top);
        k = a_e - 30 - i32(23u - top);
    } else {
        var sh = top - 23u;
        mant = rq_u64_shr(r, sh).y;
        let round_bit = (rq_u64_shr(r, sh - 1u).y & 1u) == 1u;
        if (round_bit && (rq_u64_low_set(r, sh - 1u) || (mant & 1u) == 1u)) {
            mant += 1u;
            if (mant == 0x1000000u) {
                mant = mant >> 1u;
                sh += 1u;
            }
        }
        k = a_e - 30 + i32(sh);
    }
    let biased = u32(clamp(k + 150, 1, 254));
    return bitcast<f32>(select(0u, 0x80000000u, a_neg) | (biased << 23u) | (mant & 0x7fffffu));
}

// AddRequant::apply_float: onnxruntime's MLAS QLinearAdd (AVX2) on the stored codes
// x' = x + code_offset: round_ties_even(fma(a', r_a, fma(b', r_b, F))) - code_offset,
// clamped. |u| < 2^29, so round() is exact; the clamp bounds are integers.
fn add_code_float(a: i32, b: i32, p: AddParams) -> i32 {
    let t = rq_fma_small(b + p.code_offset, p.b_ratio, p.float_offset);
    let u = rq_fma_small(a + p.code_offset, p.a_ratio, t);
    let r = round(u) - f32(p.code_offset);
    return i32(clamp(r, f32(p.lo), f32(p.hi)));
}

// AddRequant::apply.
fn add_code(a: i32, b: i32, p: AddParams) -> i32 {
    if (p.float_mode != 0) {
        return add_code_float(a, b, p);
    }
    return add_code_fixed(a, b, p);
}
