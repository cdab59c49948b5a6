/* Fused dequantization of packed KV rows to float32 for kvbench's quantized store (engine/qstore.py),
 * loaded through ctypes by engine/ckernel.py, which compiles it on first use.
 *
 * One pass per row: unpack the codes (layouts of kvbench.quant.pack_codes), then code * scale and
 * + zero in float32, each rounded: the floats of QTensor.dequantize and of the store's torch path.
 * Built with -ffp-contract=off, so the compiler never merges the two roundings into one fused
 * multiply-add. Scales and zeros come in float32 (sdt 0), float16 (1) or bfloat16 (2), widened
 * exactly. Rows are `qs` bytes apart; scales/zeros rows `ss` elements apart. */
#include <stdint.h>
#include <string.h>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define KVB_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define KVB_CLONES
#endif

static inline float h2f(uint16_t h) { /* IEEE binary16 -> binary32, exact (subnormals included) */
    uint32_t s = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu, f;
    if (e == 0) {
        if (m == 0) {
            f = s;
        } else {
            int32_t x = 1;
            while (!(m & 0x400u)) { m <<= 1; x--; }
            f = s | ((uint32_t)(x + 112) << 23) | ((m & 0x3ffu) << 13);
        }
    } else if (e == 31) {
        f = s | 0x7f800000u | (m << 13);
    } else {
        f = s | ((e + 112) << 23) | (m << 13);
    }
    float o;
    memcpy(&o, &f, 4);
    return o;
}

static inline float bf2f(uint16_t h) { uint32_t f = (uint32_t)h << 16; float o; memcpy(&o, &f, 4); return o; }

static inline float ld(const void *p, int64_t i, int sdt) {
    if (sdt == 0) return ((const float *)p)[i];
    if (sdt == 1) return h2f(((const uint16_t *)p)[i]);
    return bf2f(((const uint16_t *)p)[i]);
}

static float LUT2[256][4]; /* byte -> its four 2-bit codes as floats (kvb_init) */

void kvb_init(void) {
    for (int b = 0; b < 256; b++)
        for (int k = 0; k < 4; k++) LUT2[b][k] = (float)((b >> (2 * k)) & 3);
}

/* the d codes of one packed row, as floats, into c[0:d] */
static inline void unpack_row(const uint8_t *restrict q, int64_t d, int bits, float *restrict c) {
    if (bits == 8) {
        for (int64_t i = 0; i < d; i++) c[i] = (float)q[i];
    } else if (bits == 4) { /* two planes: code i < p is the low nibble of byte i, code p + i its high one */
        int64_t p = (d + 1) / 2;
        for (int64_t i = 0; i < p; i++) c[i] = (float)(q[i] & 15);
        for (int64_t i = 0; i < d - p; i++) c[p + i] = (float)(q[i] >> 4);
    } else if (bits == 2) { /* code i at bits 2 * (i % 4) of byte i / 4 */
        int64_t n = d / 4;
        for (int64_t i = 0; i < n; i++) memcpy(c + 4 * i, LUT2[q[i]], 16);
        for (int64_t i = 4 * n; i < d; i++) c[i] = (float)((q[i >> 2] >> (2 * (i & 3))) & 3);
    } else { /* 3 bits: 8 codes per 3-byte chunk, read as a little-endian 24-bit word */
        for (int64_t i = 0; i < d; i++) {
            const uint8_t *b = q + 3 * (i >> 3);
            uint32_t w = (uint32_t)b[0] | ((uint32_t)b[1] << 8) | ((uint32_t)b[2] << 16);
            c[i] = (float)((w >> (3 * (i & 7))) & 7);
        }
    }
}

static inline void rows_d(const uint8_t *q, int64_t qs, int64_t t, int64_t d, int bits, int64_t g,
                          const void *s, const void *z, int64_t ss, int sdt, float *out) {
    for (int64_t r = 0; r < t; r++) {
        float *restrict o = out + r * d;
        unpack_row(q + r * qs, d, bits, o);
        for (int64_t j = 0; j < d / g; j++) {
            const float a = ld(s, r * ss + j, sdt), b = ld(z, r * ss + j, sdt);
            float *restrict x = o + j * g;
            for (int64_t k = 0; k < g; k++) {
                float y = x[k] * a;
                x[k] = y + b;
            }
        }
    }
}

/* Rows quantized per token, g channels per group: out (t, d) = code * s[r, j] + z[r, j]. (Common
 * head dims and groups get their own constant-size copy of the loop.) */
KVB_CLONES void kvb_deq_rows(const uint8_t *q, int64_t qs, int64_t t, int64_t d, int bits, int64_t g,
                             const void *s, const void *z, int64_t ss, int sdt, float *out) {
    if (d == 64 && g == 64) rows_d(q, qs, t, 64, bits, 64, s, z, ss, sdt, out);
    else if (d == 64 && g == 32) rows_d(q, qs, t, 64, bits, 32, s, z, ss, sdt, out);
    else if (d == 128 && g == 128) rows_d(q, qs, t, 128, bits, 128, s, z, ss, sdt, out);
    else if (d == 128 && g == 32) rows_d(q, qs, t, 128, bits, 32, s, z, ss, sdt, out);
    else rows_d(q, qs, t, d, bits, g, s, z, ss, sdt, out);
}

static inline void chan_d(const uint8_t *q, int64_t qs, int64_t lo, int64_t t, int64_t d, int bits,
                          const int64_t *size, int64_t n_groups, const void *s, const void *z, int64_t ss, int sdt,
                          float *out) {
    float sc[d], zc[d];
    int64_t g = 0, end = n_groups ? size[0] : 0;
    while (g + 1 < n_groups && end <= lo) end += size[++g]; /* the group of row lo; it ends before row `end` */
    int64_t rem = end - lo;
    for (int64_t r = 0; r < t; r++) {
        if (r == 0 || rem == 0) {
            if (r > 0) rem = size[++g];
            for (int64_t c = 0; c < d; c++) {
                sc[c] = ld(s, g * ss + c, sdt);
                zc[c] = ld(z, g * ss + c, sdt);
            }
        }
        float *restrict o = out + r * d;
        unpack_row(q + (lo + r) * qs, d, bits, o);
        for (int64_t c = 0; c < d; c++) {
            float y = o[c] * sc[c];
            o[c] = y + zc[c];
        }
        rem--;
    }
}

/* Keys quantized per channel in groups of consecutive rows, group i holding size[i] rows (n_groups
 * groups): rows lo .. lo + t of the keys, out (t, d) = code * s[group, c] + z[group, c]. q points at
 * row 0. */
KVB_CLONES void kvb_deq_chan(const uint8_t *q, int64_t qs, int64_t lo, int64_t t, int64_t d, int bits,
                             const int64_t *size, int64_t n_groups, const void *s, const void *z, int64_t ss, int sdt,
                             float *out) {
    if (d == 64) chan_d(q, qs, lo, t, 64, bits, size, n_groups, s, z, ss, sdt, out);
    else if (d == 128) chan_d(q, qs, lo, t, 128, bits, size, n_groups, s, z, ss, sdt, out);
    else chan_d(q, qs, lo, t, d, bits, size, n_groups, s, z, ss, sdt, out);
}
