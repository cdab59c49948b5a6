/* Dequantization of packed KV rows to float32, and attention straight from them, for kvbench's
 * quantized store (engine/qstore.py),
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

/* row r's codes rescaled in place: o[j * g + k] = code * s[si + j] + z[si + j], each rounded */
static inline void deq_row(const uint8_t *restrict q, int64_t d, int bits, int64_t g, const void *s, const void *z,
                           int64_t si, int sdt, float *restrict o) {
    unpack_row(q, d, bits, o);
    for (int64_t j = 0; j < d / g; j++) {
        const float a = ld(s, si + j, sdt), b = ld(z, si + j, sdt);
        float *restrict x = o + j * g;
        for (int64_t k = 0; k < g; k++) {
            float y = x[k] * a;
            x[k] = y + b;
        }
    }
}

static inline void rows_d(const uint8_t *q, int64_t qs, int64_t t, int64_t d, int bits, int64_t g,
                          const void *s, const void *z, int64_t ss, int sdt, float *out) {
    for (int64_t r = 0; r < t; r++) deq_row(q + r * qs, d, bits, g, s, z, r * ss, sdt, out + r * d);
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

/* Channel keys read in row order from row lo: chan_start finds row lo's group (it ends before row
 * `end`); chan_next writes the next row's floats into o, loading a group's scales and zeros as the
 * rows enter it. */
typedef struct { int64_t g, rem; } chan_pos;

static inline chan_pos chan_start(const int64_t *size, int64_t n_groups, int64_t lo) {
    int64_t g = 0, end = n_groups ? size[0] : 0;
    while (g + 1 < n_groups && end <= lo) end += size[++g];
    chan_pos p = {g, end - lo};
    return p;
}

static inline void chan_next(chan_pos *p, int first, const uint8_t *row, int64_t d, int bits, const int64_t *size,
                             const void *s, const void *z, int64_t ss, int sdt, float *sc, float *zc,
                             float *restrict o) {
    if (first || p->rem == 0) {
        if (!first) p->rem = size[++p->g];
        for (int64_t c = 0; c < d; c++) {
            sc[c] = ld(s, p->g * ss + c, sdt);
            zc[c] = ld(z, p->g * ss + c, sdt);
        }
    }
    unpack_row(row, d, bits, o);
    for (int64_t c = 0; c < d; c++) {
        float y = o[c] * sc[c];
        o[c] = y + zc[c];
    }
    p->rem--;
}

static inline void chan_d(const uint8_t *q, int64_t qs, int64_t lo, int64_t t, int64_t d, int bits,
                          const int64_t *size, int64_t n_groups, const void *s, const void *z, int64_t ss, int sdt,
                          float *out) {
    float sc[d], zc[d];
    chan_pos p = chan_start(size, n_groups, lo);
    for (int64_t r = 0; r < t; r++)
        chan_next(&p, r == 0, q + (lo + r) * qs, d, bits, size, s, z, ss, sdt, sc, zc, out + r * d);
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

/* ---- attention straight from the codes (no float32 block) ------------------------------------
 * Each key or value row is dequantized into a stack buffer of d floats (the floats above), then
 * used by every query row: logits x[i, r] = q_i . k_r, or acc_i += p[i, r] * v_r. A dot product sums
 * its d products in 8 interleaved partial sums folded by a fixed tree (the same order at every call,
 * vectorizable without reassociation); sums differ from a BLAS matmul's order by float rounding. */
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

static inline void qk_rows_d(const float *qv, int64_t nq, const uint8_t *q, int64_t qs, int64_t t, int64_t d,
                             int bits, int64_t g, const void *s, const void *z, int64_t ss, int sdt, float *x,
                             int64_t ldx) {
    float buf[d];
    for (int64_t r = 0; r < t; r++) {
        deq_row(q + r * qs, d, bits, g, s, z, r * ss, sdt, buf);
        for (int64_t i = 0; i < nq; i++) x[i * ldx + r] = dot8(qv + i * d, buf, d);
    }
}

/* acc_i += w[i * ldw] * row for the nq query rows: one value row, weighted */
static inline void add_weighted(const float *w, int64_t ldw, int64_t nq, const float *restrict row, int64_t d,
                                float *acc) {
    for (int64_t i = 0; i < nq; i++) {
        const float wi = w[i * ldw];
        float *restrict a = acc + i * d;
        for (int64_t c = 0; c < d; c++) {
            float y = wi * row[c];
            a[c] = a[c] + y;
        }
    }
}

static inline void pv_rows_d(const float *p, int64_t ldp, int64_t nq, const uint8_t *q, int64_t qs, int64_t t,
                             int64_t d, int bits, int64_t g, const void *s, const void *z, int64_t ss, int sdt,
                             float *acc) {
    float buf[d];
    for (int64_t r = 0; r < t; r++) {
        deq_row(q + r * qs, d, bits, g, s, z, r * ss, sdt, buf);
        add_weighted(p + r, ldp, nq, buf, d, acc);
    }
}

static inline void qk_chan_d(const float *qv, int64_t nq, const uint8_t *q, int64_t qs, int64_t lo, int64_t t,
                             int64_t d, int bits, const int64_t *size, int64_t n_groups, const void *s,
                             const void *z, int64_t ss, int sdt, float *x, int64_t ldx) {
    float sc[d], zc[d], buf[d];
    chan_pos p = chan_start(size, n_groups, lo);
    for (int64_t r = 0; r < t; r++) {
        chan_next(&p, r == 0, q + (lo + r) * qs, d, bits, size, s, z, ss, sdt, sc, zc, buf);
        for (int64_t i = 0; i < nq; i++) x[i * ldx + r] = dot8(qv + i * d, buf, d);
    }
}

/* ---- a head's tiers in one call ---------------------------------------------------------------
 * A head's slots are a few consecutive tiers (hi, body, residual), each read one way. `desc` holds,
 * per tier, its keys' then its values' description: 16 int64 each,
 *   kind (0: float32 rows, 1: per-token codes, 2: channel-grouped key codes), bits, start slot, rows,
 *   data pointer, row stride (floats for kind 0, bytes of codes otherwise), scale pointer, zero
 *   pointer, scale row stride (elements), scale dtype, channels per group (kind 1), group sizes
 *   pointer and count (kind 2), first row (kind 2; kinds 0/1 point at it), 0, 0.
 * kvb_qk_tiers writes the logits x[i * ldx + slot] of the nq query rows; kvb_pv_tiers adds
 * p[i * ldp + slot] times each value row to acc (nq, d), with the per-row helpers above. */
#define KVB_DESC 16

static inline const void *ptr(int64_t v) { return (const void *)(intptr_t)v; }

static inline void qk_tiers_d(const float *qv, int64_t nq, int64_t d, const int64_t *desc, int64_t nt, float *x,
                              int64_t ldx) {
    for (int64_t t = 0; t < nt; t++) {
        const int64_t *k = desc + 2 * KVB_DESC * t;
        const int64_t kind = k[0], bits = k[1], start = k[2], n = k[3], qs = k[5], ss = k[8], g = k[10];
        const int sdt = (int)k[9];
        float *xo = x + start;
        if (kind == 0) {
            const float *rows = (const float *)ptr(k[4]);
            for (int64_t r = 0; r < n; r++)
                for (int64_t i = 0; i < nq; i++) xo[i * ldx + r] = dot8(qv + i * d, rows + r * qs, d);
        } else if (kind == 1) {
            if (g == d) qk_rows_d(qv, nq, (const uint8_t *)ptr(k[4]), qs, n, d, (int)bits, d, ptr(k[6]), ptr(k[7]), ss, sdt, xo, ldx);
            else if (g == 32) qk_rows_d(qv, nq, (const uint8_t *)ptr(k[4]), qs, n, d, (int)bits, 32, ptr(k[6]), ptr(k[7]), ss, sdt, xo, ldx);
            else qk_rows_d(qv, nq, (const uint8_t *)ptr(k[4]), qs, n, d, (int)bits, g, ptr(k[6]), ptr(k[7]), ss, sdt, xo, ldx);
        } else {
            qk_chan_d(qv, nq, (const uint8_t *)ptr(k[4]), qs, k[13], n, d, (int)bits, (const int64_t *)ptr(k[11]), k[12],
                      ptr(k[6]), ptr(k[7]), ss, sdt, xo, ldx);
        }
    }
}

KVB_CLONES void kvb_qk_tiers(const float *qv, int64_t nq, int64_t d, const int64_t *desc, int64_t nt, float *x,
                             int64_t ldx) {
    if (d == 64) qk_tiers_d(qv, nq, 64, desc, nt, x, ldx);
    else if (d == 128) qk_tiers_d(qv, nq, 128, desc, nt, x, ldx);
    else qk_tiers_d(qv, nq, d, desc, nt, x, ldx);
}

static inline void pv_tiers_d(const float *p, int64_t ldp, int64_t nq, int64_t d, const int64_t *desc, int64_t nt,
                              float *acc) {
    for (int64_t t = 0; t < nt; t++) {
        const int64_t *v = desc + 2 * KVB_DESC * t + KVB_DESC;
        const int64_t kind = v[0], bits = v[1], start = v[2], n = v[3], qs = v[5], ss = v[8], g = v[10];
        const int sdt = (int)v[9];
        const float *po = p + start;
        if (kind == 0) {
            const float *rows = (const float *)ptr(v[4]);
            for (int64_t r = 0; r < n; r++) add_weighted(po + r, ldp, nq, rows + r * qs, d, acc);
        } else if (g == d) {
            pv_rows_d(po, ldp, nq, (const uint8_t *)ptr(v[4]), qs, n, d, (int)bits, d, ptr(v[6]), ptr(v[7]), ss, sdt, acc);
        } else if (g == 32) {
            pv_rows_d(po, ldp, nq, (const uint8_t *)ptr(v[4]), qs, n, d, (int)bits, 32, ptr(v[6]), ptr(v[7]), ss, sdt, acc);
        } else {
            pv_rows_d(po, ldp, nq, (const uint8_t *)ptr(v[4]), qs, n, d, (int)bits, g, ptr(v[6]), ptr(v[7]), ss, sdt, acc);
        }
    }
}

KVB_CLONES void kvb_pv_tiers(const float *p, int64_t ldp, int64_t nq, int64_t d, const int64_t *desc, int64_t nt,
                             float *acc) {
    if (d == 64) pv_tiers_d(p, ldp, nq, 64, desc, nt, acc);
    else if (d == 128) pv_tiers_d(p, ldp, nq, 128, desc, nt, acc);
    else pv_tiers_d(p, ldp, nq, d, desc, nt, acc);
}
