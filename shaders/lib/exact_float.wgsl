// lib/exact_float.wgsl: exact f32 helpers shared by shaders that must match the CPU
// reference bit for bit: NaN-propagating nmin/nmax (WGSL leaves min/max
// of NaN unspecified), and correctly rounded div_rn / sqrt_rn in integer arithmetic (WGSL's
// `/` is accurate to 2.5 ulp and sqrt to its inverse-sqrt accuracy only).
//
// Bindings: none (functions only). Dispatch: none; it has no entry points.
// requires: lib/float_bits.wgsl
// Used by: observer.wgsl, conv_bn.wgsl, which name it in `// requires:` lines; their
// launchers prepend the required files with concat!(include_str!(..)), and the naga test
// validates each shader composed the same way.

// min / max that propagate NaN (WGSL leaves min/max of NaN unspecified).
fn nmin(p: f32, q: f32) -> f32 {
    if (is_nan(p)) {
        return p;
    }
    if (is_nan(q)) {
        return q;
    }
    return select(q, p, p < q);
}

fn nmax(p: f32, q: f32) -> f32 {
    if (is_nan(p)) {
        return p;
    }
    if (is_nan(q)) {
        return q;
    }
    return select(q, p, p > q);
}

// Correctly rounded (round to nearest even) f32 division a / b, like IEEE 754 and Rust's
// `a / b`, in integer arithmetic: exact on subnormal inputs and outputs too (no flushing).
// Special cases as IEEE: NaN in -> NaN; inf/inf, 0/0 -> NaN; x/0 -> +-inf; x/inf -> +-0.
fn div_rn(a: f32, b: f32) -> f32 {
    let ua = bitcast<u32>(a);
    let ub = bitcast<u32>(b);
    let sign = (ua ^ ub) & 0x80000000u;
    let aa = ua & 0x7fffffffu;
    let ab = ub & 0x7fffffffu;
    if (aa > 0x7f800000u || ab > 0x7f800000u) {
        return from_bits(0x7fc00000u);
    }
    if (aa == 0x7f800000u) {
        if (ab == 0x7f800000u) {
            return from_bits(0x7fc00000u);
        }
        return from_bits(sign | 0x7f800000u);
    }
    if (ab == 0x7f800000u) {
        return from_bits(sign);
    }
    if (ab == 0u) {
        if (aa == 0u) {
            return from_bits(0x7fc00000u);
        }
        return from_bits(sign | 0x7f800000u);
    }
    if (aa == 0u) {
        return from_bits(sign);
    }
    // 24-bit significands with the leading one at bit 23 (subnormals normalized).
    var ma = aa & 0x7fffffu;
    var ea = i32(aa >> 23u);
    if (ea == 0) {
        let s = countLeadingZeros(ma) - 8u;
        ma = ma << s;
        ea = 1 - i32(s);
    } else {
        ma = ma | 0x800000u;
    }
    var mb = ab & 0x7fffffu;
    var eb = i32(ab >> 23u);
    if (eb == 0) {
        let s = countLeadingZeros(mb) - 8u;
        mb = mb << s;
        eb = 1 - i32(s);
    } else {
        mb = mb | 0x800000u;
    }
    var e = ea - eb + 127;
    if (ma < mb) {
        ma = ma << 1u;
        e = e - 1;
    }
    // ma / mb is in [1, 2): long division gives 25 quotient bits (1 integer bit, 23 fraction
    // bits, 1 round bit) and the remainder (sticky).
    var rem = ma;
    var q = 0u;
    for (var k = 0u; k < 25u; k = k + 1u) {
        q = q << 1u;
        if (rem >= mb) {
            rem = rem - mb;
            q = q | 1u;
        }
        rem = rem << 1u;
    }
    var sticky = rem != 0u;
    if (e >= 255) {
        return from_bits(sign | 0x7f800000u);
    }
    if (e <= 0) {
        // Subnormal result: shift right by 1 - e, folding the lost bits into sticky.
        let s = u32(1 - e);
        if (s >= 26u) {
            q = 0u;
            sticky = true;
        } else {
            sticky = sticky || (q & ((1u << s) - 1u)) != 0u;
            q = q >> s;
        }
        e = 0;
    }
    let round_bit = q & 1u;
    var m = q >> 1u;
    if (round_bit == 1u && (sticky || (m & 1u) == 1u)) {
        m = m + 1u;
    }
    var bits = m;
    if (e > 0) {
        // Normal: the implicit bit of m carries into the exponent field (so does a rounding
        // carry out of the significand, up to infinity).
        bits = (u32(e - 1) << 23u) + m;
    }
    return from_bits(sign | bits);
}

// Correctly rounded (round to nearest even) f32 square root, like IEEE 754 and Rust's
// `f32::sqrt`, in integer arithmetic (WGSL's sqrt is only accurate to a few ulp): exact on
// subnormal inputs too. NaN and negative inputs (other than -0) give NaN, +-0 gives +-0,
// +inf gives +inf.
fn sqrt_rn(v: f32) -> f32 {
    let u = bitcast<u32>(v);
    let av = u & 0x7fffffffu;
    if (av == 0u) {
        return v;
    }
    if (av > 0x7f800000u || (u & 0x80000000u) != 0u) {
        return from_bits(0x7fc00000u);
    }
    if (av == 0x7f800000u) {
        return v;
    }
    // v = m * 2^e with a 24-bit significand m (leading one at bit 23).
    var m = av & 0x7fffffu;
    var e = i32(av >> 23u);
    if (e == 0) {
        let sh = countLeadingZeros(m) - 8u;
        m = m << sh;
        e = -149 - i32(sh);
    } else {
        m = m | 0x800000u;
        e = e - 150;
    }
    // Make the exponent even: m in [2^23, 2^25).
    if ((e & 1) != 0) {
        m = m << 1u;
        e = e - 1;
    }
    // M = m * 2^k2 in [2^48, 2^50) (k2 even), so r = isqrt(M) has 25 bits: 24 significand
    // bits and a round bit; the remainder is the sticky bit.
    var k2 = 24u;
    if (m < 0x1000000u) {
        k2 = 26u;
    }
    // Digit-by-digit square root over the 25 bit pairs of M (bits 49..0).
    var rem = 0u;
    var root = 0u;
    for (var p = 0u; p < 25u; p = p + 1u) {
        let bit = 48u - 2u * p;
        var pair = 0u;
        if (bit >= k2) {
            pair = (m >> (bit - k2)) & 3u;
        }
        rem = (rem << 2u) | pair;
        let trial = (root << 2u) | 1u;
        if (rem >= trial) {
            rem = rem - trial;
            root = (root << 1u) | 1u;
        } else {
            root = root << 1u;
        }
    }
    let round_bit = root & 1u;
    var sig = root >> 1u;
    if (round_bit == 1u && (rem != 0u || (sig & 1u) == 1u)) {
        sig = sig + 1u;
    }
    // sqrt(v) = sqrt(M) * 2^((e - k2) / 2) ~ sig * 2^(1 + (e - k2) / 2); biased exponent
    // 127 + 23 + 1 + (e - k2) / 2. The implicit bit of sig (and a rounding carry) adds into
    // the exponent field.
    let be = 151 + (e - i32(k2)) / 2;
    return from_bits((u32(be - 1) << 23u) + sig);
}
