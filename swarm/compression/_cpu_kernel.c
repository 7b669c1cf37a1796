/* Fused group quantize+pack and unpack+dequantize on the CPU, for swarm.compression.
 *
 * The scheme is documented in quantizer.py; this file must give the same codes and the same
 * reconstructed bits as the torch reference. Compiled with -ffp-contract=off so that
 * multiply and add are rounded separately, as in torch.
 */
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 1, DT_F16 = 2, DT_BF16 = 3 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f32_from_bits(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t bits_of(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float round_down_bf16(float x) {
    uint32_t b = bits_of(x);
    uint32_t t = b & 0xFFFF0000u;
    if ((b & 0xFFFFu) && (b & 0x80000000u)) t += 0x10000u;
    return f32_from_bits(t);
}

static inline float round_up_bf16(float x) { /* x >= 0 */
    uint32_t b = bits_of(x);
    uint32_t t = b & 0xFFFF0000u;
    if (b & 0xFFFFu) t += 0x10000u;
    return f32_from_bits(t);
}

/* Load count values of src (dtype) starting at element offset into buf as float32. */
static void load_f32(const void *src, int dtype, int64_t offset, int64_t count, float *buf) {
    if (dtype == DT_F32) {
        memcpy(buf, (const float *)src + offset, (size_t)count * 4);
    } else if (dtype == DT_F16) {
        const _Float16 *s = (const _Float16 *)src + offset;
        for (int64_t i = 0; i < count; i++) buf[i] = (float)s[i];
    } else {
        const uint16_t *s = (const uint16_t *)src + offset;
        for (int64_t i = 0; i < count; i++) buf[i] = bf16_to_f32(s[i]);
    }
}

/* Returns 0 on success, 1 when a group holds NaN/Inf. scratch: group_size floats + group_size bytes. */
int swarm_quantize_pack(const void *src, int dtype, int64_t n, int bits, int64_t group_size,
                        uint8_t *out, float *lo_out, float *scale_out, float *scratch) {
    const int64_t ng = n > 0 ? (n + group_size - 1) / group_size : 1;
    const float flevels = (float)((1u << bits) - 1u);
    float *v = scratch;
    uint8_t *codes = (uint8_t *)(scratch + group_size);
    uint8_t *o = out;
    for (int64_t g = 0; g < ng; g++) {
        const int64_t start = g * group_size;
        int64_t count = n - start;
        if (count > group_size) count = group_size;
        if (count < 0) count = 0;
        load_f32(src, dtype, start, count, v);
        float mn = count ? v[0] : 0.0f, mx = mn;
        uint32_t special = 0;
        for (int64_t i = 0; i < count; i++) {
            float x = v[i];
            mn = x < mn ? x : mn;
            mx = x > mx ? x : mx;
            uint32_t e = bits_of(x) & 0x7F800000u;
            special |= (e == 0x7F800000u); /* exponent all ones: NaN or Inf */
        }
        if (special) return 1;
        const float lo = round_down_bf16(mn);
        const float scale = round_up_bf16((mx - lo) / flevels);
        const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
        lo_out[g] = lo;
        scale_out[g] = scale;
        for (int64_t i = count; i < group_size; i++) v[i] = lo; /* padding -> code 0 */
        for (int64_t i = 0; i < group_size; i++) {
            float t = (v[i] - lo) * inv;
            t = t + 0.5f;
            t = t > flevels ? flevels : t; /* t >= 0 since v >= lo */
            codes[i] = (uint8_t)(int32_t)t;
        }
        if (bits == 8) {
            memcpy(o, codes, (size_t)group_size);
            o += group_size;
        } else if (bits == 4) {
            for (int64_t i = 0; i < group_size; i += 2) *o++ = (uint8_t)(codes[i] | (codes[i + 1] << 4));
        } else if (bits == 2) {
            for (int64_t i = 0; i < group_size; i += 4)
                *o++ = (uint8_t)(codes[i] | (codes[i + 1] << 2) | (codes[i + 2] << 4) | (codes[i + 3] << 6));
        } else {
            for (int64_t b = 0; b < group_size; b += 8) {
                uint64_t word = 0;
                for (int j = 0; j < 8; j++) word |= ((uint64_t)codes[b + j]) << (bits * j);
                memcpy(o, &word, (size_t)bits); /* little-endian hosts only (checked in Python) */
                o += bits;
            }
        }
    }
    return 0;
}

/* Unpack + dequantize n values into dst (DT_F32 or DT_F16). scratch: group_size bytes. */
void swarm_unpack_dequantize(const uint8_t *packed, const float *lo_in, const float *scale_in,
                             int64_t n, int bits, int64_t group_size, void *dst, int out_dtype,
                             uint8_t *codes) {
    const int64_t ng = n > 0 ? (n + group_size - 1) / group_size : 1;
    const uint64_t mask = (1ull << bits) - 1ull;
    const uint8_t *p = packed;
    for (int64_t g = 0; g < ng; g++) {
        if (bits == 8) {
            memcpy(codes, p, (size_t)group_size);
            p += group_size;
        } else if (bits == 4) {
            for (int64_t i = 0; i < group_size; i += 2, p++) {
                codes[i] = *p & 15;
                codes[i + 1] = *p >> 4;
            }
        } else if (bits == 2) {
            for (int64_t i = 0; i < group_size; i += 4, p++) {
                codes[i] = *p & 3;
                codes[i + 1] = (*p >> 2) & 3;
                codes[i + 2] = (*p >> 4) & 3;
                codes[i + 3] = *p >> 6;
            }
        } else {
            for (int64_t b = 0; b < group_size; b += 8) {
                uint64_t word = 0;
                memcpy(&word, p, (size_t)bits);
                p += bits;
                for (int j = 0; j < 8; j++) codes[b + j] = (uint8_t)((word >> (bits * j)) & mask);
            }
        }
        const int64_t start = g * group_size;
        int64_t count = n - start;
        if (count > group_size) count = group_size;
        const float lo = lo_in[g], scale = scale_in[g];
        if (out_dtype == DT_F16) {
            _Float16 *d = (_Float16 *)dst + start;
            for (int64_t i = 0; i < count; i++) {
                float x = (float)codes[i] * scale;
                x = x + lo;
                d[i] = (_Float16)x;
            }
        } else {
            float *d = (float *)dst + start;
            for (int64_t i = 0; i < count; i++) {
                float x = (float)codes[i] * scale;
                x = x + lo;
                d[i] = x;
            }
        }
    }
}
