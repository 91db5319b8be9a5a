/* One-pass fake quantization on CPU (the C fast path of harness.formats): reads and writes the
 * input's own dtype (fp32, bf16, fp16), fp32 only in registers, tiles split over n_threads
 * POSIX threads (no OpenMP runtime: torch's own would compete with a second one's spinning
 * workers). Built with -march=native where the compiler has it (fast.py keys the build on the CPU).
 *
 * A tile is tile_rows x tile_cols elements of a row-major (n_mats, n_rows, row_len) tensor:
 * 1 x 32 or 1 x 16 for 1-D blocks, 32 x 32 for mxfp4_2d. Same arithmetic as the reference path
 * (harness/formats/elements.py, scales.py, quant.py, philox.py), in the same order, in fp32 with
 * IEEE semantics (built with -fno-fast-math -ffp-contract=off), so the results are bit-identical:
 *   amax   = max |x| over the tile (NaN or Inf anywhere: the whole tile is NaN)
 *   E8M0   e = clamp(shared_exponent(amax, scale_mode), -127, 127); scale 2^e, multiplier 2^-e
 *   E4M3   stored = E4M3_RNE(clamp(amax / elem_max [/ p], 2^-6, 448)); multiplier = 1/stored
 *          (or (1/p)/stored); dequantization scale p * stored
 *   element: a = |x * multiplier|; k = max(floor_log2(a), emin) - mbits; t = a * 2^-k (exact);
 *            n = rint(t) (ties to even; (t + 2^23) - 2^23), or stochastically floor(t) + (u < t -
 *            floor(t)) with u the element's Philox4x32-10 uniform; q = min(n * 2^k, elem_max)
 *   out = sign(x) q * scale + zero, rounded to the output dtype to nearest even; zero is +0 for
 *         two's-complement elements (they have no -0: -0 + +0 = +0) and -0 otherwise (the identity)
 * quantize_tiles writes codes instead (harness/formats/elements.py's encode, quant.py's quantize):
 *   element code of the signed grid value q: magnitude ((max(floor_log2|q|, emin) - emin) << mbits)
 *         + |q| 2^-k (the significand in steps), then the sign bit above it, or for two's-complement
 *         elements the negated magnitude; tile after tile, FP4 two per byte (element 2i low nibble)
 *   scale code: E8M0 e + 127, E4M3 the same magnitude code on its grid; NaN tiles: codes 0, NaN code
 */
#include <math.h>
#include <pthread.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    int64_t n_mats, n_rows, row_len;
    int32_t tile_rows, tile_cols;
    int32_t dtype;      /* 0 fp32, 1 bf16, 2 fp16 */
    int32_t emin, mbits, emax;
    float max_value;
    int32_t scale_kind; /* 0 E8M0, 1 E4M3 */
    int32_t scale_mode; /* E8M0 shared exponent: 0 floor, 1 ceil, 2 even, 3 rceil */
    float per_tensor_scale; /* <= 0: none */
    int32_t stochastic;
    uint64_t seed;
    int32_t n_threads;
    int32_t twos_complement; /* element codes are two's-complement integers: no -0 */
    int32_t scale_emin, scale_mbits; /* E4M3 scale: its grid (emin, mantissa bits, max) */
    float scale_max;
    int32_t ebits;          /* element exponent bits: the sign bit of a code is bit ebits + mbits */
    int32_t scale_nan_code; /* the stored scale of a tile holding NaN or Inf */
} params_t;

#define MAX_TILE 1024

static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }
static inline float float_of(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }

/* exactly 2^e for integer e in [-149, 127] (subnormal powers included) */
static inline float exp2_int(int e) {
    if (e >= -126) return float_of((uint32_t)(e + 127) << 23);
    return float_of(1u << (e + 149));
}

/* ---- dtype conversions (exact widening; narrowing to nearest even, as torch's .to()) ---- */
static inline float bf16_to_float(uint16_t h) { return float_of((uint32_t)h << 16); }
static inline uint16_t float_to_bf16(float f) { /* finite or Inf input (NaN is written directly) */
    uint32_t u = bits_of(f);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
/* F. Giesen's half <-> float conversions (public domain), exact / round to nearest even */
static inline float fp16_to_float(uint16_t h) {
    uint32_t o = (uint32_t)(h & 0x7FFF) << 13, exp = o & 0x0F800000u;
    o += (uint32_t)(127 - 15) << 23;
    if (exp == 0x0F800000u) o += (uint32_t)(128 - 16) << 23; /* Inf/NaN */
    else if (exp == 0) { o += 1u << 23; o = bits_of(float_of(o) - float_of(113u << 23)); } /* subnormal */
    return float_of(o | ((uint32_t)(h & 0x8000) << 16));
}
static inline uint16_t float_to_fp16(float f) { /* finite or Inf input */
    uint32_t u = bits_of(f), sign = (u >> 16) & 0x8000u, h;
    u &= 0x7FFFFFFFu;
    if (u >= 0x47800000u) h = 0x7C00; /* >= 2^16 or Inf: Inf */
    else if (u < 0x38800000u) h = bits_of(float_of(u) + 0.5f) - 0x3F000000u; /* subnormal: FPU rounds */
    else h = (u + 0xC8000FFFu + ((u >> 13) & 1u)) >> 13;
    return (uint16_t)(h | sign);
}
static inline float load(const void *x, int dtype, int64_t i) {
    if (dtype == 0) return ((const float *)x)[i];
    if (dtype == 1) return bf16_to_float(((const uint16_t *)x)[i]);
    return fp16_to_float(((const uint16_t *)x)[i]);
}
static inline void store(void *out, int dtype, int64_t i, float v) {
    if (dtype == 0) ((float *)out)[i] = v;
    else if (dtype == 1) ((uint16_t *)out)[i] = float_to_bf16(v);
    else ((uint16_t *)out)[i] = float_to_fp16(v);
}
static inline void store_nan(void *out, int dtype, int64_t i) {
    if (dtype == 0) ((float *)out)[i] = NAN;
    else ((uint16_t *)out)[i] = dtype == 1 ? 0x7FC0 : 0x7E00;
}

/* ---- Philox4x32-10 (Random123), as harness/formats/philox.py: element n of the block tensor
 * takes word n % 4 at counter (n / 4, 0, 0, 0); u = (word >> 8) 2^-24. One round maps
 * (c0, c1, c2, c3) to (hi(M1 c2) ^ c1 ^ k0, lo(M1 c2), hi(M0 c0) ^ c3 ^ k1, lo(M0 c0)), then the
 * key steps by the Weyl constants. With AVX-512 (-march=native on such a CPU) 16 counters go
 * through all ten rounds in registers, the high products from two 32x32->64 multiplies; otherwise
 * the loops run across counters so the compiler vectorizes them. n_counters a multiple of 4
 * words' worth. ---- */
#define PHILOX_M0 0xD2511F53u
#define PHILOX_M1 0xCD9E8D57u
#define PHILOX_W0 0x9E3779B9u
#define PHILOX_W1 0xBB67AE85u
#define PHILOX_UNIT 5.9604644775390625e-08f /* 2^-24 */
#if defined(__AVX512F__)
#include <immintrin.h>
static inline __m512i mulhi_epu32(__m512i a, __m512i m) { /* high halves of a * m, 16 lanes */
    __m512i even = _mm512_mul_epu32(a, m), odd = _mm512_mul_epu32(_mm512_srli_epi64(a, 32), m);
    return _mm512_mask_blend_epi32(0xAAAA, _mm512_srli_epi64(even, 32), odd);
}
static inline void philox_uniforms(uint64_t counter0, int n_counters, uint64_t key, float *u) {
    const __m512i m0 = _mm512_set1_epi32((int)PHILOX_M0), m1 = _mm512_set1_epi32((int)PHILOX_M1);
    uint32_t ks0[10], ks1[10]; /* the key schedule */
    for (int r = 0; r < 10; ++r) {
        ks0[r] = (uint32_t)key + (uint32_t)r * PHILOX_W0;
        ks1[r] = (uint32_t)(key >> 32) + (uint32_t)r * PHILOX_W1;
    }
    for (int j0 = 0; j0 < n_counters; j0 += 16) {
        const uint64_t first = counter0 + (uint64_t)j0;
        const __m512i lo0 = _mm512_set1_epi32((int)(uint32_t)first);
        __m512i c0 = _mm512_add_epi32(lo0, _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        __m512i c1 = _mm512_mask_add_epi32(_mm512_set1_epi32((int)(uint32_t)(first >> 32)), _mm512_cmplt_epu32_mask(c0, lo0),
                                           _mm512_set1_epi32((int)(uint32_t)(first >> 32)), _mm512_set1_epi32(1));
        __m512i c2 = _mm512_setzero_si512(), c3 = _mm512_setzero_si512();
        for (int r = 0; r < 10; ++r) {
            __m512i h0 = mulhi_epu32(c0, m0), l0 = _mm512_mullo_epi32(c0, m0);
            __m512i h1 = mulhi_epu32(c2, m1), l1 = _mm512_mullo_epi32(c2, m1);
            c0 = _mm512_ternarylogic_epi32(h1, c1, _mm512_set1_epi32((int)ks0[r]), 0x96);
            c2 = _mm512_ternarylogic_epi32(h0, c3, _mm512_set1_epi32((int)ks1[r]), 0x96);
            c1 = l1;
            c3 = l0;
        }
        const __m512 unit = _mm512_set1_ps(PHILOX_UNIT);
        __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c0, 8)), unit);
        __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c1, 8)), unit);
        __m512 w2 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c2, 8)), unit);
        __m512 w3 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(c3, 8)), unit);
        const __m512i lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
        const __m512i hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
        __m512 a = _mm512_permutex2var_ps(w0, lo_idx, w2), b = _mm512_permutex2var_ps(w0, hi_idx, w2);
        __m512 c = _mm512_permutex2var_ps(w1, lo_idx, w3), d = _mm512_permutex2var_ps(w1, hi_idx, w3);
        float o[64];
        _mm512_storeu_ps(o, _mm512_permutex2var_ps(a, lo_idx, c));
        _mm512_storeu_ps(o + 16, _mm512_permutex2var_ps(a, hi_idx, c));
        _mm512_storeu_ps(o + 32, _mm512_permutex2var_ps(b, lo_idx, d));
        _mm512_storeu_ps(o + 48, _mm512_permutex2var_ps(b, hi_idx, d));
        const int n = n_counters - j0 < 16 ? n_counters - j0 : 16;
        memcpy(u + 4 * j0, o, (size_t)n * 4 * sizeof(float));
    }
}
#else
static inline void philox_uniforms(uint64_t counter0, int n_counters, uint64_t key, float *u) {
    uint32_t c0[MAX_TILE / 4], c1[MAX_TILE / 4], c2[MAX_TILE / 4], c3[MAX_TILE / 4];
    for (int j = 0; j < n_counters; ++j) {
        uint64_t c = counter0 + (uint64_t)j;
        c0[j] = (uint32_t)c; c1[j] = (uint32_t)(c >> 32); c2[j] = 0; c3[j] = 0;
    }
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int r = 0; r < 10; ++r) {
        for (int j = 0; j < n_counters; ++j) {
            uint64_t p0 = (uint64_t)PHILOX_M0 * c0[j], p1 = (uint64_t)PHILOX_M1 * c2[j];
            uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1[j] ^ k0, n2 = (uint32_t)(p0 >> 32) ^ c3[j] ^ k1;
            c1[j] = (uint32_t)p1; c3[j] = (uint32_t)p0; c0[j] = n0; c2[j] = n2;
        }
        k0 += PHILOX_W0; k1 += PHILOX_W1;
    }
    for (int j = 0; j < n_counters; ++j) {
        u[4 * j] = (float)(c0[j] >> 8) * PHILOX_UNIT;
        u[4 * j + 1] = (float)(c1[j] >> 8) * PHILOX_UNIT;
        u[4 * j + 2] = (float)(c2[j] >> 8) * PHILOX_UNIT;
        u[4 * j + 3] = (float)(c3[j] >> 8) * PHILOX_UNIT;
    }
}
#endif

/* ---- the tile ---- */
static inline int e8m0_exponent(float amax, const params_t *p) {
    uint32_t ab = bits_of(amax);
    int e;
    switch (p->scale_mode) {
    case 1: e = (int)(ab >> 23) - 127 + ((ab & 0x7FFFFFu) != 0) - p->emax; break;
    case 2: e = (int)((ab + (1u << (22 - p->mbits))) >> 23) - 127 - p->emax; break;
    case 3: {
        uint32_t db = bits_of(amax / p->max_value);
        e = (db & 0x7F800000u) == 0 ? -127 : (int)(db >> 23) - 127 + ((db & 0x7FFFFFu) != 0);
        break;
    }
    default: e = (int)(ab >> 23) - 127 - p->emax;
    }
    return e < -127 ? -127 : (e > 127 ? 127 : e);
}

/* grid value of |v| (before saturation): t = |v| 2^-k and the step 2^k, k = max(floor_log2|v|, emin) - mbits */
static inline float grid_t(float v, int emin, int mbits, float *step) {
    uint32_t ab = bits_of(v) & 0x7FFFFFFFu;
    int e = (int)(ab >> 23) - 127;
    int k = (e < emin ? emin : e) - mbits;
    *step = float_of((uint32_t)(127 + k) << 23);
    return float_of(ab) * float_of((uint32_t)(127 - k) << 23);
}
static inline float finish(float n, float step, float max_value, float v, float scale) {
    float q = n * step;
    q = q < max_value ? q : max_value;
    return float_of(bits_of(q) | (bits_of(v) & 0x80000000u)) * scale;
}

/* code of |a| for a non-negative grid value a: exponent field and mantissa, subnormals included */
static inline int magnitude_code(float a, int emin, int mbits) {
    float step, t = grid_t(a, emin, mbits, &step); /* the significand in steps: an exact integer */
    int e = (int)(bits_of(a) >> 23) - 127;
    return (((e < emin ? emin : e) - emin) << mbits) + (int)t;
}
static inline int packs_two(const params_t *p) { return 1 + p->ebits + p->mbits == 4; } /* FP4 codes */
static inline uint8_t element_code(float q, const params_t *p) {
    uint32_t negative = bits_of(q) >> 31;
    int mag = magnitude_code(float_of(bits_of(q) & 0x7FFFFFFFu), p->emin, p->mbits);
    if (p->twos_complement) return (uint8_t)(negative ? -mag : mag);
    return (uint8_t)(mag | (int)(negative << (p->ebits + p->mbits)));
}

static inline void scales_of(float amax, const params_t *p, float *multiplier, float *scale, uint8_t *code) {
    if (p->scale_kind == 0) {
        int e = e8m0_exponent(amax, p);
        *multiplier = exp2_int(-e);
        *scale = exp2_int(e);
        *code = (uint8_t)(e + 127);
        return;
    }
    int has_pts = p->per_tensor_scale > 0.0f;
    float raw = amax / p->max_value;
    if (has_pts) raw = raw / p->per_tensor_scale;
    const float smallest = exp2_int(p->scale_emin);
    raw = raw < smallest ? smallest : (raw > p->scale_max ? p->scale_max : raw);
    float step, t = grid_t(raw, p->scale_emin, p->scale_mbits, &step);
    float stored = finish((t + 8388608.0f) - 8388608.0f, step, p->scale_max, raw, 1.0f);
    *multiplier = has_pts ? (1.0f / p->per_tensor_scale) / stored : 1.0f / stored;
    *scale = has_pts ? p->per_tensor_scale * stored : stored;
    *code = (uint8_t)magnitude_code(stored, p->scale_emin, p->scale_mbits);
}

/* element i (row r, column c) of a tile: quantized and scaled by its tile's multiplier and scale,
 * to nearest even or (SR) up with probability t - floor(t) for its uniform u_i */
static inline __attribute__((always_inline)) float quantized(float x, float multiplier, float scale, float zero,
                                                            float limit, const params_t *p, const float *u,
                                                            int i, const int SR) {
    float v = x * multiplier, step, t = grid_t(v, p->emin, p->mbits, &step), n;
    if (SR) {
        n = (float)(int32_t)t; /* floor: 0 <= t < 2^(mbits+1) */
        n += u[i] < t - n ? 1.0f : 0.0f;
    } else n = (t + 8388608.0f) - 8388608.0f;
    return finish(n, step, limit, v, scale) + zero;
}

/* The largest grid value g with g * 2^-multiplier's exponent finite in the output dtype: the
 * ceil, even and rceil E8M0 rules can pick a scale whose top codes overflow near the dtype's max
 * (floor never does); those codes saturate here, every other code is unchanged. */
static inline float grid_limit(float multiplier, const params_t *p) {
    if (p->scale_kind != 0 || p->scale_mode == 0) return p->max_value;
    const float out_max = p->dtype == 0 ? 3.40282347e38f : (p->dtype == 1 ? float_of(0x7F7F0000u) : 65504.0f);
    float v = out_max * multiplier, step;
    if (!(v < p->max_value)) return p->max_value;
    float t = grid_t(v, p->emin, p->mbits, &step);
    return (float)(int32_t)t * step; /* round down onto the grid */
}

/* `nt` tiles side by side in one strip (tile g's first element at base + g * TC): `rows` x TC
 * elements each, the last one `cols` wide, `u` their uniforms (tile after tile) when stochastic.
 * Passes over the whole group, which stays in L1 between them: the tiles' amax, their scales,
 * their elements; so the scalar scale work of one tile overlaps the vector work of the others.
 * fp32 rows (TR == 1, DIRECT) are read where they lie, twice; other dtypes and 2-D tiles are
 * first widened into `buf` (zero padding leaves the amax unchanged), quantized there and written
 * back. CODES: each tile's element codes at codes + g * code_bytes (TR * TC, or half as many bytes
 * for 4-bit codes, padding included) and its scale code at scale_codes[g] instead of `out`.
 * TR, TC, DTYPE, SR, CODES are compile-time constants after inlining (in run_range's specialised
 * instances; the codes instance has TR, TC, DTYPE and SR at run time). amax and finiteness come
 * from one integer max of |x|'s bits (non-negative floats order as their bits; NaN and Inf are
 * the bit patterns >= 0x7F800000), which vectorizes. */
static inline __attribute__((always_inline)) void do_tiles(const void *x, void *out, uint8_t *codes,
                                                          uint8_t *scale_codes, const params_t *p,
                                                          const float *u, int64_t base, int nt, int rows,
                                                          int cols, const int TR, const int TC,
                                                          const int DTYPE, const int SR, const int CODES) {
    const int DIRECT = DTYPE == 0 && TR == 1 && !CODES;
    float buf[MAX_TILE], multiplier[MAX_TILE], scale[MAX_TILE], limit[MAX_TILE]; /* buf: unused when DIRECT */
    int32_t amax_bits[MAX_TILE];
    uint8_t stored_code[MAX_TILE];
    const int per = TR * TC, full = rows == TR && cols == TC;
    const int64_t rl = p->row_len;
    const float zero = p->twos_complement && !CODES ? 0.0f : -0.0f;
    if (!DIRECT) {
        if (!full)
            for (int i = 0; i < nt * per; ++i) buf[i] = 0.0f;
        for (int g = 0; g < nt; ++g) {
            const int gr = full ? TR : rows, gc = full || g < nt - 1 ? TC : cols;
            for (int r = 0; r < gr; ++r)
                for (int c = 0; c < gc; ++c) buf[g * per + r * TC + c] = load(x, DTYPE, base + g * TC + r * rl + c);
        }
    }
    for (int g = 0; g < nt; ++g) {
        int32_t m = 0;
        const int gc = DIRECT && g == nt - 1 ? cols : TC; /* DIRECT: one row, the last tile may be partial */
        for (int i = 0; i < (DIRECT ? gc : per); ++i) {
            int32_t a = (int32_t)(bits_of(DIRECT ? ((const float *)x)[base + g * TC + i] : buf[g * per + i]) & 0x7FFFFFFFu);
            m = a > m ? a : m;
        }
        amax_bits[g] = m;
    }
    for (int g = 0; g < nt; ++g) {
        if (amax_bits[g] < 0x7F800000)
            scales_of(float_of((uint32_t)amax_bits[g]), p, &multiplier[g], &scale[g], &stored_code[g]);
        else { /* NaN or Inf in the tile */
            multiplier[g] = scale[g] = 0.0f;
            stored_code[g] = (uint8_t)p->scale_nan_code;
        }
        limit[g] = grid_limit(multiplier[g], p);
        if (CODES) scale[g] = 1.0f; /* codes: of the grid values themselves */
    }
    for (int g = 0; g < nt; ++g) {
        const float mul = multiplier[g], sc = scale[g], lim = limit[g];
        const float *ug = SR ? u + g * per : NULL;
        const int gr = full ? TR : rows, gc = full || g < nt - 1 ? TC : cols;
        const int64_t at = base + g * TC;
        if (DIRECT) {
            if (amax_bits[g] >= 0x7F800000)
                for (int c = 0; c < gc; ++c) ((float *)out)[at + c] = NAN;
            else
                for (int c = 0; c < gc; ++c)
                    ((float *)out)[at + c] = quantized(((const float *)x)[at + c], mul, sc, zero, lim, p, ug, c, SR);
            continue;
        }
        float *b = buf + g * per;
        if (amax_bits[g] < 0x7F800000)
            for (int i = 0; i < per; ++i) b[i] = quantized(b[i], mul, sc, zero, lim, p, ug, i, SR);
        if (CODES) {
            const int64_t code_bytes = packs_two(p) ? per / 2 : per;
            uint8_t *cg = codes + g * code_bytes;
            scale_codes[g] = stored_code[g];
            if (amax_bits[g] >= 0x7F800000) memset(cg, 0, (size_t)code_bytes);
            else if (packs_two(p)) /* two per byte, element 2i in the low nibble */
                for (int i = 0; i < per / 2; ++i) cg[i] = (uint8_t)(element_code(b[2 * i], p) | element_code(b[2 * i + 1], p) << 4);
            else
                for (int i = 0; i < per; ++i) cg[i] = element_code(b[i], p);
        } else if (amax_bits[g] >= 0x7F800000) {
            for (int r = 0; r < gr; ++r)
                for (int c = 0; c < gc; ++c) store_nan(out, DTYPE, at + r * rl + c);
        } else if (full) {
            for (int r = 0; r < TR; ++r)
                for (int c = 0; c < TC; ++c) store(out, DTYPE, at + r * rl + c, b[r * TC + c]);
        } else {
            for (int r = 0; r < gr; ++r)
                for (int c = 0; c < gc; ++c) store(out, DTYPE, at + r * rl + c, b[r * TC + c]);
        }
    }
}

typedef struct {
    const void *x;
    void *out;
    uint8_t *codes, *scale_codes; /* quantize_tiles: the outputs (out is NULL) */
    const params_t *p;
    int64_t begin, end;
} range_t;

/* tiles [begin, end) in order, strip by strip (a strip: TR rows of one matrix), in groups of up to
 * MAX_TILE elements' worth of consecutive tiles of one strip, no division per tile; stochastic:
 * the group's uniforms at once (their Philox counters are consecutive), so the generator's loops
 * are long enough to vectorize */
#define LOOP(TR, TC, DTYPE, SR, CODES)                                                             \
    {                                                                                              \
        const int64_t tiles_c = (p->row_len + (TC) - 1) / (TC), tiles_r = (p->n_rows + (TR) - 1) / (TR); \
        int64_t t = r->begin, tc = t % tiles_c, strip = t / tiles_c;                               \
        const int64_t group = MAX_TILE / ((TR) * (TC));                                            \
        const int64_t code_bytes = packs_two(p) ? (TR) * (TC) / 2 : (TR) * (TC);                   \
        float u[MAX_TILE];                                                                         \
        for (; t < r->end; tc = 0, ++strip) {                                                      \
            const int64_t r0 = (strip % tiles_r) * (TR);                                           \
            const int rows = (int)(p->n_rows - r0 < (TR) ? p->n_rows - r0 : (TR));                 \
            const int64_t row_base = ((strip / tiles_r) * p->n_rows + r0) * p->row_len;            \
            while (tc < tiles_c && t < r->end) {                                                   \
                int64_t nt = tiles_c - tc < group ? tiles_c - tc : group;                          \
                nt = r->end - t < nt ? r->end - t : nt;                                            \
                const int64_t last = tc + nt - 1;                                                  \
                const int cols = (int)(p->row_len - last * (TC) < (TC) ? p->row_len - last * (TC) : (TC)); \
                if (SR) philox_uniforms((uint64_t)t * ((TR) * (TC) / 4), (int)(nt * (TR) * (TC) / 4), p->seed, u); \
                do_tiles(r->x, r->out, (CODES) ? r->codes + t * code_bytes : NULL,                 \
                         (CODES) ? r->scale_codes + t : NULL, p, u, row_base + tc * (TC), (int)nt, rows, cols, \
                         TR, TC, DTYPE, SR, CODES);                                                \
                tc += nt;                                                                          \
                t += nt;                                                                           \
            }                                                                                      \
        }                                                                                          \
    }

#define BY_DTYPE(TR, TC, SR, CODES)                                                                \
    switch (p->dtype) {                                                                            \
    case 0: LOOP(TR, TC, 0, SR, CODES) break;                                                      \
    case 1: LOOP(TR, TC, 1, SR, CODES) break;                                                      \
    default: LOOP(TR, TC, 2, SR, CODES) break;                                                     \
    }

/* Tiles [begin, end): specialised instances for the registry's tile shapes, a generic one for
 * any other (tile_rows * tile_cols <= MAX_TILE, a multiple of 4 when stochastic); real
 * quantization (codes) takes one instance generic in shape and dtype too (not 18 more: the build
 * stays short; its loads and stores branch on the dtype, and it still runs near fake quantization). */
static void run_range(const range_t *r) {
    const params_t *p = r->p;
    if (r->codes) { LOOP(p->tile_rows, p->tile_cols, p->dtype, p->stochastic, 1) }
    else if (p->tile_rows == 1 && p->tile_cols == 32 && !p->stochastic) { BY_DTYPE(1, 32, 0, 0) }
    else if (p->tile_rows == 1 && p->tile_cols == 32) { BY_DTYPE(1, 32, 1, 0) }
    else if (p->tile_rows == 1 && p->tile_cols == 16 && !p->stochastic) { BY_DTYPE(1, 16, 0, 0) }
    else if (p->tile_rows == 32 && p->tile_cols == 32 && !p->stochastic) { BY_DTYPE(32, 32, 0, 0) }
    else if (p->stochastic) { BY_DTYPE(p->tile_rows, p->tile_cols, 1, 0) }
    else { BY_DTYPE(p->tile_rows, p->tile_cols, 0, 0) }
}

static void *thread_main(void *arg) {
    run_range((const range_t *)arg);
    return NULL;
}

#define MAX_THREADS 64
#define MIN_ELEMENTS_PER_THREAD 65536 /* below this a thread costs more than it saves */

/* how many threads share n_items items of per_item elements: at most n_threads, MAX_THREADS, n_items */
static int64_t thread_count(int64_t n_items, int64_t per_item, int64_t n_threads) {
    int64_t n = n_items * per_item / MIN_ELEMENTS_PER_THREAD;
    n = n < n_threads ? n : n_threads;
    n = n < n_items ? n : n_items;
    return n < MAX_THREADS ? (n < 1 ? 1 : n) : MAX_THREADS;
}

/* main_fn on each of the n ranges (`size` bytes apart from `ranges`): the first here, the others
 * on their own threads (or here, after it, where no thread can be had) */
static void run_threads(void *ranges, size_t size, int64_t n, void *(*main_fn)(void *)) {
    pthread_t threads[MAX_THREADS];
    int started[MAX_THREADS] = {0};
    char *at = (char *)ranges;
    for (int64_t i = 1; i < n; ++i) started[i] = pthread_create(&threads[i], NULL, main_fn, at + i * size) == 0;
    main_fn(at);
    for (int64_t i = 1; i < n; ++i) {
        if (started[i]) pthread_join(threads[i], NULL);
        else main_fn(at + i * size);
    }
}

static void run_tiles(const void *x, void *out, uint8_t *codes, uint8_t *scale_codes, const params_t *p) {
    const int64_t per_tile = (int64_t)p->tile_rows * p->tile_cols;
    const int64_t n_tiles = p->n_mats * ((p->n_rows + p->tile_rows - 1) / p->tile_rows) *
                            ((p->row_len + p->tile_cols - 1) / p->tile_cols);
    const int64_t n = thread_count(n_tiles, per_tile, p->n_threads);
    range_t ranges[MAX_THREADS];
    for (int64_t i = 0; i < n; ++i) {
        range_t rg = {x, out, codes, scale_codes, p, n_tiles * i / n, n_tiles * (i + 1) / n};
        ranges[i] = rg;
    }
    run_threads(ranges, sizeof(range_t), n, thread_main);
}

/* fake quantization: out (x's shape and dtype) = the dequantized grid values */
void fake_quantize_tiles(const void *x, void *out, const params_t *p) { run_tiles(x, out, NULL, NULL, p); }

/* real quantization: codes (tile after tile, bytes per tile: TR * TC, half for FP4), one scale code per tile */
void quantize_tiles(const void *x, uint8_t *codes, uint8_t *scale_codes, const params_t *p) {
    run_tiles(x, NULL, codes, scale_codes, p);
}

/* ---- real-valued (amax) scales: harness/formats/affine.py, on the same build. Two passes.
 * affine_stats: per group (a tile_rows x tile_cols tile of the row-major (n_mats, n_rows, row_len)
 * tensor) min x and max x, exact in fp32, from integer min/max of an order-preserving key of the
 * bits (vectorizes; NaN sorts beyond +-Inf, so a group holding NaN or Inf has a non-finite min or
 * max). fast_affine.py computes the scales from these two values with affine.qparams itself (the
 * reference's own ops), then affine_tiles applies them, per element, with the group's operand m,
 * zero point z (0 without one) and scale s, as affine.quantize_groups / dequantize_groups:
 *   v = round_v(x / m) or round_v(x * m) (fp32, rounded to torch's promoted dtype: x's when
 *       narrow, which is also the scale's, else fp32); NaN -> 0 (nan_to_zero: vLLM's nan_to_num);
 *       v = round_v(v + z)
 *   integer: q = rint(clamp(v, qmin, qmax)) + 0 (ties to even, no -0); E4M3: clamp(v, -max, max)
 *            rounded onto the grid to nearest even
 *   out = round_x(clamp(round_s((q - z) * s), -out_max, out_max)); groups not finite: NaN ---- */
typedef struct {
    int64_t n_mats, n_rows, row_len, tile_rows, tile_cols;
    int32_t dtype, n_threads;
    int32_t divide, narrow, nan_to_zero, integer; /* affine_tiles only */
    float qmin, qmax; /* integer: the code range; E4M3: -max, max */
    int32_t emin, mbits;
    float out_max; /* the largest finite value of dtype */
} affine_params_t;

static inline float round_to(float v, int dtype) {
    if (dtype == 1) return bf16_to_float(float_to_bf16(v));
    if (dtype == 2) return fp16_to_float(float_to_fp16(v));
    return v;
}
static inline int32_t order_key(float v) { /* signed-integer order of the floats, -0 < +0 */
    int32_t b = (int32_t)bits_of(v);
    return b ^ ((b >> 31) & 0x7FFFFFFF);
}
static inline float key_float(int32_t k) { return float_of((uint32_t)(k ^ ((k >> 31) & 0x7FFFFFFF))); }

typedef struct {
    const void *x;
    void *out;
    float *stats;
    const float *mult, *zero, *scale;
    const uint8_t *finite;
    const affine_params_t *p;
    int64_t begin, end; /* strips (stats) or rows (tiles) */
} affine_range_t;

#define STATS_CHUNK 2048 /* tiles of a strip whose (min, max) keys are kept at once, on the stack */
static inline __attribute__((always_inline)) void stats_range(const affine_range_t *r, const int DTYPE) {
    const affine_params_t *p = r->p;
    const int64_t TR = p->tile_rows, TC = p->tile_cols, rl = p->row_len;
    const int64_t tiles_c = (rl + TC - 1) / TC, tiles_r = (p->n_rows + TR - 1) / TR;
    int32_t keys[2 * STATS_CHUNK];
    for (int64_t strip = r->begin; strip < r->end; ++strip) {
        const int64_t r0 = (strip % tiles_r) * TR, rows = p->n_rows - r0 < TR ? p->n_rows - r0 : TR;
        const int64_t base = ((strip / tiles_r) * p->n_rows + r0) * rl;
        for (int64_t t0 = 0; t0 < tiles_c; t0 += STATS_CHUNK) {
            const int64_t nt = tiles_c - t0 < STATS_CHUNK ? tiles_c - t0 : STATS_CHUNK;
            for (int64_t j = 0; j < nt; ++j) keys[2 * j] = INT32_MAX, keys[2 * j + 1] = INT32_MIN;
            for (int64_t i = 0; i < rows; ++i) /* in memory order: row after row, its tiles' segments */
                for (int64_t j = 0; j < nt; ++j) {
                    const int64_t c0 = (t0 + j) * TC, at = base + i * rl + c0, cols = rl - c0 < TC ? rl - c0 : TC;
                    int32_t lo = keys[2 * j], hi = keys[2 * j + 1];
                    for (int64_t c = 0; c < cols; ++c) {
                        const int32_t k = order_key(load(r->x, DTYPE, at + c));
                        lo = k < lo ? k : lo;
                        hi = k > hi ? k : hi;
                    }
                    keys[2 * j] = lo, keys[2 * j + 1] = hi;
                }
            float *st = r->stats + 2 * (strip * tiles_c + t0);
            for (int64_t j = 0; j < 2 * nt; ++j) st[j] = key_float(keys[j]);
        }
    }
}

/* NARROW: x / m, v + z and (q - z) * s are rounded to x's dtype (else all fp32); z is -0 for
 * formats without a zero point (v + -0 is v), +0 where they add one of 0 (-0 + +0 = +0) */
static inline __attribute__((always_inline)) float affine_value(float x, float m, float z, float zd, float s,
                                                               int nan_to_zero, float qmin, float qmax,
                                                               float out_max, const affine_params_t *p,
                                                               const int DTYPE, const int INTEGER,
                                                               const int DIVIDE, const int NARROW) {
    const int vd = NARROW ? DTYPE : 0;
    float v = round_to(DIVIDE ? x / m : x * m, vd);
    { /* NaN -> +0 by masking its bits (a select on a float compare does not vectorize here) */
        const uint32_t b = bits_of(v), nan = (uint32_t)nan_to_zero & ((b & 0x7FFFFFFFu) > 0x7F800000u);
        v = float_of(b & (nan - 1u));
    }
    v = round_to(v + z, vd);
    v = v < qmin ? qmin : (v > qmax ? qmax : v);
    float q;
    if (INTEGER) { /* |v| <= 128: (|v| + 2^23) - 2^23 is rint, ties to even */
        const float a = float_of(bits_of(v) & 0x7FFFFFFFu);
        q = float_of(bits_of((a + 8388608.0f) - 8388608.0f) | (bits_of(v) & 0x80000000u)) + 0.0f;
    } else {
        float step, t = grid_t(v, p->emin, p->mbits, &step);
        q = finish((t + 8388608.0f) - 8388608.0f, step, qmax, v, 1.0f);
    }
    const float d = round_to((q - zd) * s, vd);
    return d < -out_max ? -out_max : (d > out_max ? out_max : d);
}

static inline __attribute__((always_inline)) void tiles_range(const affine_range_t *r, const int DTYPE,
                                                             const int INTEGER, const int DIVIDE, const int NARROW) {
    const affine_params_t *p = r->p;
    const int nan_to_zero = p->nan_to_zero;
    const float qmin = p->qmin, qmax = p->qmax, out_max = p->out_max;
    const int64_t TR = p->tile_rows, TC = p->tile_cols, rl = p->row_len;
    const int64_t tiles_c = (rl + TC - 1) / TC, tiles_r = (p->n_rows + TR - 1) / TR;
    for (int64_t row = r->begin; row < r->end; ++row) {
        const int64_t g0 = ((row / p->n_rows) * tiles_r + (row % p->n_rows) / TR) * tiles_c;
        for (int64_t tc = 0; tc < tiles_c; ++tc) {
            const int64_t g = g0 + tc, at = row * rl + tc * TC, cols = rl - tc * TC < TC ? rl - tc * TC : TC;
            if (!r->finite[g]) {
                for (int64_t c = 0; c < cols; ++c) store_nan(r->out, DTYPE, at + c);
                continue;
            }
            const float m = r->mult[g], z = r->zero[g], zd = z + 0.0f, s = r->scale[g];
            for (int64_t c = 0; c < cols; ++c)
                store(r->out, DTYPE, at + c,
                      affine_value(load(r->x, DTYPE, at + c), m, z, zd, s, nan_to_zero, qmin, qmax, out_max, p,
                                   DTYPE, INTEGER, DIVIDE, NARROW));
        }
    }
}

#define AFFINE_BY_DTYPE(CALL, ...)                                                                 \
    switch (r->p->dtype) {                                                                         \
    case 0: CALL(r, 0, ##__VA_ARGS__); break;                                                      \
    case 1: CALL(r, 1, ##__VA_ARGS__); break;                                                      \
    default: CALL(r, 2, ##__VA_ARGS__); break;                                                     \
    }

static void *affine_stats_main(void *arg) {
    const affine_range_t *r = (const affine_range_t *)arg;
    AFFINE_BY_DTYPE(stats_range)
    return NULL;
}
static void *affine_tiles_main(void *arg) {
    const affine_range_t *r = (const affine_range_t *)arg;
    switch (r->p->integer * 4 + r->p->divide * 2 + r->p->narrow) {
    case 0: AFFINE_BY_DTYPE(tiles_range, 0, 0, 0) break;
    case 1: AFFINE_BY_DTYPE(tiles_range, 0, 0, 1) break;
    case 2: AFFINE_BY_DTYPE(tiles_range, 0, 1, 0) break;
    case 3: AFFINE_BY_DTYPE(tiles_range, 0, 1, 1) break;
    case 4: AFFINE_BY_DTYPE(tiles_range, 1, 0, 0) break;
    case 5: AFFINE_BY_DTYPE(tiles_range, 1, 0, 1) break;
    case 6: AFFINE_BY_DTYPE(tiles_range, 1, 1, 0) break;
    default: AFFINE_BY_DTYPE(tiles_range, 1, 1, 1) break;
    }
    return NULL;
}

/* `n_items` (strips or rows) of `per_item` elements each, split over up to n_threads threads */
static void affine_run(affine_range_t proto, int64_t n_items, int64_t per_item, void *(*main_fn)(void *)) {
    const int64_t n = thread_count(n_items, per_item, proto.p->n_threads);
    affine_range_t ranges[MAX_THREADS];
    for (int64_t i = 0; i < n; ++i) {
        ranges[i] = proto;
        ranges[i].begin = n_items * i / n;
        ranges[i].end = n_items * (i + 1) / n;
    }
    run_threads(ranges, sizeof(affine_range_t), n, main_fn);
}

/* stats: (min, max) of every group, group after group (strip after strip, tiles along the row) */
void affine_stats(const void *x, float *stats, const affine_params_t *p) {
    affine_range_t proto = {x, NULL, stats, NULL, NULL, NULL, NULL, p, 0, 0};
    const int64_t strips = p->n_mats * ((p->n_rows + p->tile_rows - 1) / p->tile_rows);
    affine_run(proto, strips, p->tile_rows * p->row_len, affine_stats_main);
}

/* fake quantization with the groups' operands, zero points, scales and finiteness */
void affine_tiles(const void *x, void *out, const float *mult, const float *zero, const float *scale,
                  const uint8_t *finite, const affine_params_t *p) {
    affine_range_t proto = {x, out, NULL, mult, zero, scale, finite, p, 0, 0};
    affine_run(proto, p->n_mats * p->n_rows, p->row_len, affine_tiles_main);
}
