/* Dequantization of packed KV rows to float32, and attention straight from them, for kvbench's
 * quantized store (engine/qstore.py),
 * loaded through ctypes by engine/ckernel.py, which compiles it on first use.
 *
 * One pass per row: unpack the codes (layouts of kvbench.quant.pack_codes), then code * scale and
 * + zero in float32, each rounded: the floats of QTensor.dequantize and of the store's torch path.
 * Built with -ffp-contract=off, so the compiler never merges the two roundings into one fused
 * multiply-add. Scales and zeros come in float32 (sdt 0), float16 (1) or bfloat16 (2), widened
 * exactly. Rows are `qs` bytes apart; scales/zeros rows `ss` elements apart.
 *
 * The kernels' body (end of this file) is compiled twice by including the file into itself: once
 * portable, once for x86 AVX2 + FMA + F16C (intrinsics: codes unpacked 8 at a time, dot products
 * and weighted sums 8 lanes wide). kvb_init picks the AVX2 copy where the CPU has it; kvb_simd
 * switches (tests run both). Dequantized floats are the same in both (a multiply, then an add, each
 * rounded); the AVX2 copy fuses multiply and add only in the sums of the attention kernels. */
#ifndef KVB_BODY /* ---- once: what both instruction sets share, the exported entry points ------ */
#include <stdint.h>
#include <string.h>
#if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
#define KVB_X86 1
#include <immintrin.h>
#endif

static inline float h2f(uint16_t h) { /* IEEE binary16 -> binary32, exact (subnormals included) */
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13; /* exponent and mantissa, moved into place */
    const uint32_t e = o & 0x0f800000u;
    o += (uint32_t)(127 - 15) << 23;             /* rebias the exponent */
    float f;
    if (e == 0x0f800000u) {                      /* inf / nan: the exponent goes all ones */
        o += (uint32_t)(128 - 16) << 23;
        memcpy(&f, &o, 4);
    } else if (e == 0) {                         /* zero / subnormal: m * 2^-24, exact in binary32 */
        o += 1u << 23;
        memcpy(&f, &o, 4);
        const uint32_t magic = 113u << 23;
        float m;
        memcpy(&m, &magic, 4);
        f -= m;
    } else {
        memcpy(&f, &o, 4);
    }
    return (h & 0x8000u) ? -f : f;
}

static inline float bf2f(uint16_t h) { uint32_t f = (uint32_t)h << 16; float o; memcpy(&o, &f, 4); return o; }

static inline float ld(const void *p, int64_t i, int sdt) {
    if (sdt == 0) return ((const float *)p)[i];
    if (sdt == 1) return h2f(((const uint16_t *)p)[i]);
    return bf2f(((const uint16_t *)p)[i]);
}

static float LUT2[256][4]; /* byte -> its four 2-bit codes as floats (kvb_init) */

/* codes from..d - 1 of one packed row, as floats, into c (from: a multiple of 8, or 0) */
static inline void unpack_from(const uint8_t *restrict q, int64_t d, int bits, float *restrict c, int64_t from) {
    if (bits == 8) {
        for (int64_t i = from; i < d; i++) c[i] = (float)q[i];
    } else if (bits == 4) { /* two planes: code i < p is the low nibble of byte i, code p + i its high one */
        int64_t p = (d + 1) / 2;
        for (int64_t i = from; i < p; i++) c[i] = (float)(q[i] & 15);
        for (int64_t i = from; i < d - p; i++) c[p + i] = (float)(q[i] >> 4);
    } else if (bits == 2) { /* code i at bits 2 * (i % 4) of byte i / 4 */
        int64_t n = d / 4;
        for (int64_t i = from / 4; i < n; i++) memcpy(c + 4 * i, LUT2[q[i]], 16);
        for (int64_t i = 4 * n; i < d; i++) c[i] = (float)((q[i >> 2] >> (2 * (i & 3))) & 3);
    } else { /* 3 bits: 8 codes per 3-byte chunk, read as a little-endian 24-bit word */
        for (int64_t i = from; i < d; i++) {
            const uint8_t *b = q + 3 * (i >> 3);
            uint32_t w = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16);
            c[i] = (float)((w >> (3 * (i & 7))) & 7);
        }
    }
}

/* d products summed in 8 interleaved partial sums, folded by a fixed tree */
static inline float dot8(const float *restrict a, const float *restrict b, int64_t d) {
    float s[8];
    for (int k = 0; k < 8; k++) s[k] = 0.0f;
    const int64_t full = d - (int64_t)((uint64_t)d & 7u);
    for (int64_t i = 0; i < full; i += 8)
        for (int k = 0; k < 8; k++) {
            float y = a[i + k] * b[i + k];
            s[k] = s[k] + y;
        }
    for (int64_t k = 0; k < d - full; k++) {
        float y = a[full + k] * b[full + k];
        s[k] = s[k] + y;
    }
    const float t0 = s[0] + s[4], t1 = s[1] + s[5], t2 = s[2] + s[6], t3 = s[3] + s[7];
    return (t0 + t2) + (t1 + t3);
}

/* Channel keys read in row order from row lo: chan_start finds row lo's group (it ends before row
 * `end`); chan_next (per instruction set) writes the next row's floats, loading a group's scales
 * and zeros as the rows enter it. */
typedef struct { int64_t g, rem; } chan_pos;

static inline chan_pos chan_start(const int64_t *size, int64_t n_groups, int64_t lo) {
    int64_t g = 0, end = n_groups ? size[0] : 0;
    while (g + 1 < n_groups && end <= lo) end += size[++g];
    chan_pos p = {g, end - lo};
    return p;
}

/* A head's tiers in one call: a head's slots are a few consecutive tiers (hi, body, residual), each
 * read one way. `desc` holds, per tier, its keys' then its values' description: 16 int64 each,
 *   kind (0: float32 rows, 1: per-token codes, 2: channel-grouped key codes), bits, start slot, rows,
 *   data pointer, row stride (floats for kind 0, bytes of codes otherwise), scale pointer, zero
 *   pointer, scale row stride (elements), scale dtype, channels per group (kind 1), group sizes
 *   pointer and count (kind 2), first row (kind 2; kinds 0/1 point at it), 0, 0.
 * kvb_qk_tiers writes the logits x[i * ldx + slot] of the nq query rows; kvb_pv_tiers adds
 * p[i * ldp + slot] times each value row to acc (nq, d). */
#define KVB_DESC 16

static inline const void *ptr(int64_t v) { return (const void *)(intptr_t)v; }

/* the body, portable */
#define KVB_BODY 1
#define ISA(name) name##_c
#define TARGET
#include __FILE__
#undef ISA
#undef TARGET

#ifdef KVB_X86 /* the body again, for AVX2 + FMA + F16C */
#define KVB_SIMD 1
#define ISA(name) name##_avx2
#define TARGET __attribute__((target("avx2,fma,f16c")))
#include __FILE__
#undef ISA
#undef TARGET
#undef KVB_SIMD
#endif

static int use_avx2 = 0; /* which copy the entry points run (kvb_init, kvb_simd) */

static int has_avx2(void) {
#ifdef KVB_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

void kvb_init(void) {
    for (int b = 0; b < 256; b++)
        for (int k = 0; k < 4; k++) LUT2[b][k] = (float)((b >> (2 * k)) & 3);
    use_avx2 = has_avx2();
}

/* on: 1 runs the AVX2 copy where the CPU has it, 0 the portable one, -1 leaves it; returns which runs */
int kvb_simd(int on) {
    if (on >= 0) use_avx2 = on && has_avx2();
    return use_avx2;
}

#ifdef KVB_X86
#define KVB_PICK(name, args) do { if (use_avx2) name##_avx2 args; else name##_c args; } while (0)
#else
#define KVB_PICK(name, args) name##_c args
#endif

/* Rows quantized per token, g channels per group: out (t, d) = code * s[r, j] + z[r, j]. */
void kvb_deq_rows(const uint8_t *q, int64_t qs, int64_t t, int64_t d, int bits, int64_t g, const void *s,
                  const void *z, int64_t ss, int sdt, float *out) {
    KVB_PICK(deq_rows, (q, qs, t, d, bits, g, s, z, ss, sdt, out));
}

/* Keys quantized per channel in groups of consecutive rows, group i holding size[i] rows (n_groups
 * groups): rows lo .. lo + t of the keys, out (t, d) = code * s[group, c] + z[group, c]. q points at
 * row 0. */
void kvb_deq_chan(const uint8_t *q, int64_t qs, int64_t lo, int64_t t, int64_t d, int bits, const int64_t *size,
                  int64_t n_groups, const void *s, const void *z, int64_t ss, int sdt, float *out) {
    KVB_PICK(deq_chan, (q, qs, lo, t, d, bits, size, n_groups, s, z, ss, sdt, out));
}

void kvb_qk_tiers(const float *qv, int64_t nq, int64_t d, const int64_t *desc, int64_t nt, float *x, int64_t ldx) {
    KVB_PICK(qk_tiers, (qv, nq, d, desc, nt, x, ldx));
}

void kvb_pv_tiers(const float *p, int64_t ldp, int64_t nq, int64_t d, const int64_t *desc, int64_t nt, float *acc) {
    KVB_PICK(pv_tiers, (p, ldp, nq, d, desc, nt, acc));
}

#else /* ---- KVB_BODY: the kernels, once per instruction set (ISA(name), TARGET) ---------------- */

/* the d codes of one packed row, as floats, into c[0:d] */
static inline TARGET void ISA(unpack_row)(const uint8_t *restrict q, int64_t d, int bits, float *restrict c) {
    int64_t i = 0;
#ifdef KVB_SIMD
    if (bits == 4 && !(d & 1)) { /* 8 bytes: 8 low nibbles (codes i..), 8 high ones (codes p + i..) */
        const int64_t p = d / 2;
        const __m128i m = _mm_set1_epi8(15);
        for (; i + 8 <= p; i += 8) {
            const __m128i b = _mm_loadl_epi64((const __m128i *)(q + i));
            _mm256_storeu_ps(c + i, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(b, m))));
            _mm256_storeu_ps(c + p + i, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(b, 4), m))));
        }
    } else if (bits == 8) {
        for (; i + 8 <= d; i += 8)
            _mm256_storeu_ps(c + i, _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(q + i)))));
    } else if (bits == 2 || bits == 3) { /* 8 codes from one 16-bit (2-bit) or 24-bit (3-bit) word */
        const __m256i sh = bits == 2 ? _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14)
                                     : _mm256_setr_epi32(0, 3, 6, 9, 12, 15, 18, 21);
        const __m256i m = _mm256_set1_epi32((1 << bits) - 1);
        for (; i + 8 <= d; i += 8) {
            const uint8_t *b = q + (i >> 3) * bits;
            uint32_t w = (uint32_t)b[0] | ((uint32_t)b[1] << 8);
            if (bits == 3) w |= (uint32_t)b[2] << 16;
            const __m256i v = _mm256_and_si256(_mm256_srlv_epi32(_mm256_set1_epi32((int)w), sh), m);
            _mm256_storeu_ps(c + i, _mm256_cvtepi32_ps(v));
        }
    }
#endif
    unpack_from(q, d, bits, c, i);
}

/* n scales (or zeros) from element i0 of p, widened to float32 */
static inline TARGET void ISA(load_row)(const void *p, int64_t i0, int64_t n, int sdt, float *restrict o) {
    int64_t c = 0;
#ifdef KVB_SIMD
    const uint16_t *h = (const uint16_t *)p + i0;
    if (sdt == 1)
        for (; c + 8 <= n; c += 8) _mm256_storeu_ps(o + c, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(h + c))));
    else if (sdt == 2)
        for (; c + 8 <= n; c += 8)
            _mm256_storeu_ps(o + c, _mm256_castsi256_ps(_mm256_slli_epi32(
                                        _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)(h + c))), 16)));
#endif
    for (; c < n; c++) o[c] = ld(p, i0 + c, sdt);
}

/* row r's codes rescaled in place: o[j * g + k] = code * s[si + j] + z[si + j], each rounded */
static inline TARGET void ISA(deq_row)(const uint8_t *restrict q, int64_t d, int bits, int64_t g, const void *s,
                                       const void *z, int64_t si, int sdt, float *restrict o) {
    ISA(unpack_row)(q, d, bits, o);
    for (int64_t j = 0; j < d / g; j++) {
        const float a = ld(s, si + j, sdt), b = ld(z, si + j, sdt);
        float *restrict x = o + j * g;
        for (int64_t k = 0; k < g; k++) {
            float y = x[k] * a;
            x[k] = y + b;
        }
    }
}

static inline TARGET void ISA(rows_d)(const uint8_t *q, int64_t qs, int64_t t, int64_t d, int bits, int64_t g,
                                      const void *s, const void *z, int64_t ss, int sdt, float *out) {
    for (int64_t r = 0; r < t; r++) ISA(deq_row)(q + r * qs, d, bits, g, s, z, r * ss, sdt, out + r * d);
}

/* (common head dims and groups get their own constant-size copy of the loop) */
static TARGET void ISA(deq_rows)(const uint8_t *q, int64_t qs, int64_t t, int64_t d, int bits, int64_t g,
                                 const void *s, const void *z, int64_t ss, int sdt, float *out) {
    if (d == 64 && g == 64) ISA(rows_d)(q, qs, t, 64, bits, 64, s, z, ss, sdt, out);
    else if (d == 64 && g == 32) ISA(rows_d)(q, qs, t, 64, bits, 32, s, z, ss, sdt, out);
    else if (d == 128 && g == 128) ISA(rows_d)(q, qs, t, 128, bits, 128, s, z, ss, sdt, out);
    else if (d == 128 && g == 32) ISA(rows_d)(q, qs, t, 128, bits, 32, s, z, ss, sdt, out);
    else ISA(rows_d)(q, qs, t, d, bits, g, s, z, ss, sdt, out);
}

static inline TARGET void ISA(chan_next)(chan_pos *p, int first, const uint8_t *row, int64_t d, int bits,
                                         const int64_t *size, const void *s, const void *z, int64_t ss, int sdt,
                                         float *sc, float *zc, float *restrict o) {
    if (first || p->rem == 0) {
        if (!first) p->rem = size[++p->g];
        ISA(load_row)(s, p->g * ss, d, sdt, sc);
        ISA(load_row)(z, p->g * ss, d, sdt, zc);
    }
    ISA(unpack_row)(row, d, bits, o);
    for (int64_t c = 0; c < d; c++) {
        float y = o[c] * sc[c];
        o[c] = y + zc[c];
    }
    p->rem--;
}

static inline TARGET void ISA(chan_d)(const uint8_t *q, int64_t qs, int64_t lo, int64_t t, int64_t d, int bits,
                                      const int64_t *size, int64_t n_groups, const void *s, const void *z, int64_t ss,
                                      int sdt, float *out) {
    float sc[d], zc[d];
    chan_pos p = chan_start(size, n_groups, lo);
    for (int64_t r = 0; r < t; r++)
        ISA(chan_next)(&p, r == 0, q + (lo + r) * qs, d, bits, size, s, z, ss, sdt, sc, zc, out + r * d);
}

static TARGET void ISA(deq_chan)(const uint8_t *q, int64_t qs, int64_t lo, int64_t t, int64_t d, int bits,
                                 const int64_t *size, int64_t n_groups, const void *s, const void *z, int64_t ss,
                                 int sdt, float *out) {
    if (d == 64) ISA(chan_d)(q, qs, lo, t, 64, bits, size, n_groups, s, z, ss, sdt, out);
    else if (d == 128) ISA(chan_d)(q, qs, lo, t, 128, bits, size, n_groups, s, z, ss, sdt, out);
    else ISA(chan_d)(q, qs, lo, t, d, bits, size, n_groups, s, z, ss, sdt, out);
}

/* ---- attention straight from the codes (no float32 block) ------------------------------------
 * Each key or value row is dequantized into a stack buffer of d floats (the floats above), then
 * used by every query row: logits x[i, r] = q_i . k_r, or acc_i += p[i, r] * v_r. A dot product sums
 * its d products in 8 interleaved partial sums folded by a fixed tree (dot8; the AVX2 copy: 8 lanes,
 * fused multiply-add, folded by the same tree); sums differ from a BLAS matmul's order by float
 * rounding. */
static inline TARGET float ISA(dot)(const float *restrict a, const float *restrict b, int64_t d) {
#ifdef KVB_SIMD
    if (d >= 8 && !(d & 7)) {
        __m256 s = _mm256_mul_ps(_mm256_loadu_ps(a), _mm256_loadu_ps(b));
        for (int64_t i = 8; i < d; i += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s);
        __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)); /* s0+s4 .. s3+s7 */
        h = _mm_add_ps(h, _mm_movehl_ps(h, h));                                     /* t0+t2, t1+t3 */
        return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
    }
#endif
    return dot8(a, b, d);
}

/* acc_i += w[i * ldw] * row for the nq query rows: one value row, weighted */
static inline TARGET void ISA(add_weighted)(const float *w, int64_t ldw, int64_t nq, const float *restrict row,
                                            int64_t d, float *acc) {
    for (int64_t i = 0; i < nq; i++) {
        const float wi = w[i * ldw];
        float *restrict a = acc + i * d;
        int64_t c = 0;
#ifdef KVB_SIMD
        const __m256 wv = _mm256_set1_ps(wi);
        for (; c + 8 <= d; c += 8)
            _mm256_storeu_ps(a + c, _mm256_fmadd_ps(wv, _mm256_loadu_ps(row + c), _mm256_loadu_ps(a + c)));
#endif
        for (; c < d; c++) {
            float y = wi * row[c];
            a[c] = a[c] + y;
        }
    }
}

static inline TARGET void ISA(qk_rows_d)(const float *qv, int64_t nq, const uint8_t *q, int64_t qs, int64_t t,
                                         int64_t d, int bits, int64_t g, const void *s, const void *z, int64_t ss,
                                         int sdt, float *x, int64_t ldx) {
    float buf[d];
    for (int64_t r = 0; r < t; r++) {
        ISA(deq_row)(q + r * qs, d, bits, g, s, z, r * ss, sdt, buf);
        for (int64_t i = 0; i < nq; i++) x[i * ldx + r] = ISA(dot)(qv + i * d, buf, d);
    }
}

static inline TARGET void ISA(pv_rows_d)(const float *p, int64_t ldp, int64_t nq, const uint8_t *q, int64_t qs,
                                         int64_t t, int64_t d, int bits, int64_t g, const void *s, const void *z,
                                         int64_t ss, int sdt, float *acc) {
    float buf[d];
    for (int64_t r = 0; r < t; r++) {
        ISA(deq_row)(q + r * qs, d, bits, g, s, z, r * ss, sdt, buf);
        ISA(add_weighted)(p + r, ldp, nq, buf, d, acc);
    }
}

static inline TARGET void ISA(qk_chan_d)(const float *qv, int64_t nq, const uint8_t *q, int64_t qs, int64_t lo,
                                         int64_t t, int64_t d, int bits, const int64_t *size, int64_t n_groups,
                                         const void *s, const void *z, int64_t ss, int sdt, float *x, int64_t ldx) {
    float sc[d], zc[d], buf[d];
    chan_pos p = chan_start(size, n_groups, lo);
    for (int64_t r = 0; r < t; r++) {
        ISA(chan_next)(&p, r == 0, q + (lo + r) * qs, d, bits, size, s, z, ss, sdt, sc, zc, buf);
        for (int64_t i = 0; i < nq; i++) x[i * ldx + r] = ISA(dot)(qv + i * d, buf, d);
    }
}

static inline TARGET void ISA(qk_tiers_d)(const float *qv, int64_t nq, int64_t d, const int64_t *desc, int64_t nt,
                                          float *x, int64_t ldx) {
    for (int64_t t = 0; t < nt; t++) {
        const int64_t *k = desc + 2 * KVB_DESC * t;
        const int64_t kind = k[0], bits = k[1], start = k[2], n = k[3], qs = k[5], ss = k[8], g = k[10];
        const int sdt = (int)k[9];
        const uint8_t *q = (const uint8_t *)ptr(k[4]);
        float *xo = x + start;
        if (kind == 0) {
            const float *rows = (const float *)ptr(k[4]);
            for (int64_t r = 0; r < n; r++)
                for (int64_t i = 0; i < nq; i++) xo[i * ldx + r] = ISA(dot)(qv + i * d, rows + r * qs, d);
        } else if (kind == 1) {
            if (g == d) ISA(qk_rows_d)(qv, nq, q, qs, n, d, (int)bits, d, ptr(k[6]), ptr(k[7]), ss, sdt, xo, ldx);
            else if (g == 32) ISA(qk_rows_d)(qv, nq, q, qs, n, d, (int)bits, 32, ptr(k[6]), ptr(k[7]), ss, sdt, xo, ldx);
            else ISA(qk_rows_d)(qv, nq, q, qs, n, d, (int)bits, g, ptr(k[6]), ptr(k[7]), ss, sdt, xo, ldx);
        } else {
            ISA(qk_chan_d)(qv, nq, q, qs, k[13], n, d, (int)bits, (const int64_t *)ptr(k[11]), k[12], ptr(k[6]),
                           ptr(k[7]), ss, sdt, xo, ldx);
        }
    }
}

static TARGET void ISA(qk_tiers)(const float *qv, int64_t nq, int64_t d, const int64_t *desc, int64_t nt, float *x,
                                 int64_t ldx) {
    if (d == 64) ISA(qk_tiers_d)(qv, nq, 64, desc, nt, x, ldx);
    else if (d == 128) ISA(qk_tiers_d)(qv, nq, 128, desc, nt, x, ldx);
    else ISA(qk_tiers_d)(qv, nq, d, desc, nt, x, ldx);
}

static inline TARGET void ISA(pv_tiers_d)(const float *p, int64_t ldp, int64_t nq, int64_t d, const int64_t *desc,
                                          int64_t nt, float *acc) {
    for (int64_t t = 0; t < nt; t++) {
        const int64_t *v = desc + 2 * KVB_DESC * t + KVB_DESC;
        const int64_t kind = v[0], bits = v[1], start = v[2], n = v[3], qs = v[5], ss = v[8], g = v[10];
        const int sdt = (int)v[9];
        const uint8_t *q = (const uint8_t *)ptr(v[4]);
        const float *po = p + start;
        if (kind == 0) {
            const float *rows = (const float *)ptr(v[4]);
            for (int64_t r = 0; r < n; r++) ISA(add_weighted)(po + r, ldp, nq, rows + r * qs, d, acc);
        } else if (g == d) {
            ISA(pv_rows_d)(po, ldp, nq, q, qs, n, d, (int)bits, d, ptr(v[6]), ptr(v[7]), ss, sdt, acc);
        } else if (g == 32) {
            ISA(pv_rows_d)(po, ldp, nq, q, qs, n, d, (int)bits, 32, ptr(v[6]), ptr(v[7]), ss, sdt, acc);
        } else {
            ISA(pv_rows_d)(po, ldp, nq, q, qs, n, d, (int)bits, g, ptr(v[6]), ptr(v[7]), ss, sdt, acc);
        }
    }
}

static TARGET void ISA(pv_tiers)(const float *p, int64_t ldp, int64_t nq, int64_t d, const int64_t *desc, int64_t nt,
                                 float *acc) {
    if (d == 64) ISA(pv_tiers_d)(p, ldp, nq, 64, desc, nt, acc);
    else if (d == 128) ISA(pv_tiers_d)(p, ldp, nq, 128, desc, nt, acc);
    else ISA(pv_tiers_d)(p, ldp, nq, d, desc, nt, acc);
}
#endif /* KVB_BODY */
