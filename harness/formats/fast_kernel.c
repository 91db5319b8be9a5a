/* One-pass fake quantization of fp32 rows in 1-D blocks (the CPU fast path of harness.formats).
 *
 * Same arithmetic as the reference path (harness/formats/elements.py, scales.py, quant.py), in
 * the same order, in fp32 with IEEE semantics (built with -fno-fast-math -ffp-contract=off), so
 * the results are bit-identical:
 *   amax   = max |x| over the block (NaN or Inf anywhere: the whole block is NaN)
 *   E8M0   e = clamp(floor_log2(amax) - emax_elem, -127, 127); stored = 2^e; multiplier = 2^-e
 *   E4M3   stored = E4M3_RNE(clamp(amax / elem_max [/ p], 2^-6, 448)); multiplier = 1/stored
 *          (or (1/p)/stored); dequantization scale p * stored
 *   element: a = |x * multiplier|; step = max(2^floor_log2(a), 2^emin) * 2^-mbits;
 *            q = min(rint(a / step) * step, elem_max) with the sign of x * multiplier
 *   out = q * scale
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* exactly 2^e for integer e in [-149, 127] (subnormal powers included) */
static inline float exp2_int(int e) {
    if (e >= -126) return float_of((uint32_t)(e + 127) << 23);
    return float_of(1u << (e + 149));
}

static inline int floor_log2(float a) { return (int)((bits_of(a) >> 23) & 0xFF) - 127; }

/* round |v| onto the element grid (ties to even), saturate, restore the sign */
static inline float round_to_grid(float v, int emin, int mbits, float max_value) {
    float a = fabsf(v);
    float binade = float_of(bits_of(a) & 0x7F800000u);
    float floor_step = exp2_int(emin);
    float step = (binade < floor_step ? floor_step : binade) * exp2_int(-mbits);
    float q = nearbyintf(a / step) * step;
    if (q > max_value) q = max_value;
    return copysignf(q, v);
}

/* x, out: n_rows x row_len fp32, blocks of `block` along the row (a partial last block is
 * zero-padded, which leaves its amax unchanged). scale_kind 0: E8M0, 1: E4M3 (NVFP4).
 * per_tensor_scale <= 0: none. */
void fake_quantize_rows(const float *x, float *out, int64_t n_rows, int64_t row_len, int64_t block,
                        int emin, int mbits, int emax, float max_value, int scale_kind,
                        float per_tensor_scale, int n_threads) {
    const int64_t blocks_per_row = (row_len + block - 1) / block;
    const int64_t n_blocks = n_rows * blocks_per_row;
    const int has_pts = per_tensor_scale > 0.0f;
#pragma omp parallel for schedule(static) num_threads(n_threads)
    for (int64_t b = 0; b < n_blocks; ++b) {
        const int64_t row = b / blocks_per_row, start = (b % blocks_per_row) * block;
        const int64_t len = row_len - start < block ? row_len - start : block;
        const float *xb = x + row * row_len + start;
        float *ob = out + row * row_len + start;
        float amax = 0.0f;
        int finite = 1;
        for (int64_t i = 0; i < len; ++i) {
            float a = fabsf(xb[i]);
            finite &= isfinite(a) != 0;
            amax = a > amax ? a : amax;
        }
        if (!finite) {
            for (int64_t i = 0; i < len; ++i) ob[i] = NAN;
            continue;
        }
        float multiplier, scale;
        if (scale_kind == 0) {
            int e = floor_log2(amax) - emax;
            e = e < -127 ? -127 : (e > 127 ? 127 : e);
            multiplier = exp2_int(-e);
            scale = exp2_int(e);
        } else {
            float raw = amax / max_value;
            if (has_pts) raw = raw / per_tensor_scale;
            raw = raw < 0.015625f ? 0.015625f : (raw > 448.0f ? 448.0f : raw);
            float stored = round_to_grid(raw, -6, 3, 448.0f); /* E4M3: emin -6, 3 mantissa bits */
            multiplier = has_pts ? (1.0f / per_tensor_scale) / stored : 1.0f / stored;
            scale = has_pts ? per_tensor_scale * stored : stored;
        }
        for (int64_t i = 0; i < len; ++i)
            ob[i] = round_to_grid(xb[i] * multiplier, emin, mbits, max_value) * scale;
    }
}
