/* Fused group quantize+pack and unpack+dequantize on the CPU, for swarm.compression.
 *
 * The scheme is documented in quantizer.py; this file must give the same codes and the same
 * reconstructed bits as the torch reference. Compiled with -ffp-contract=off so that
 * multiply and add are rounded separately, as in torch.
 */
#include <stdint.h>
#include <string.h>
#if defined(__BMI2__) || (defined(__AVX2__) && defined(__F16C__))
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__F16C__)
#define SWARM_AVX2 1
#endif

enum { DT_F32 = 1, DT_F16 = 2, DT_BF16 = 3 };

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = ((uint32_t)h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

/* byte mask selecting the low `bits` bits of each of the 8 bytes of a word */
static inline uint64_t lane_mask(int bits) { return 0x0101010101010101ull * ((1ull << bits) - 1ull); }

/* 8 codes (one per byte of w, each < 2^bits) -> the dense little-endian 8*bits-bit block */
static inline uint64_t pack8(uint64_t w, int bits) {
#if defined(__BMI2__)
    return _pext_u64(w, lane_mask(bits));
#else
    uint64_t out = 0;
    for (int j = 0; j < 8; j++) out |= ((w >> (8 * j)) & 0xFFull) << (bits * j);
    return out;
#endif
}

static inline uint64_t unpack8(uint64_t block, int bits) {
#if defined(__BMI2__)
    return _pdep_u64(block, lane_mask(bits));
#else
    uint64_t out = 0, m = (1ull << bits) - 1ull;
    for (int j = 0; j < 8; j++) out |= ((block >> (bits * j)) & m) << (8 * j);
    return out;
#endif
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

#ifdef SWARM_AVX2
/* Load 8*k values (k = count/8) into buf as float32 and return min/max; *special set on NaN/Inf. */
static void load_minmax_avx2(const void *src, int dtype, int64_t offset, int64_t count, float *buf,
                             float *mn_out, float *mx_out, uint32_t *special) {
    __m256 vmn = _mm256_set1_ps(__builtin_inff()), vmx = _mm256_set1_ps(-__builtin_inff());
    const __m256i expmask = _mm256_set1_epi32(0x7F800000);
    __m256i sp = _mm256_setzero_si256();
    for (int64_t i = 0; i < count; i += 8) {
        __m256 x;
        if (dtype == DT_F16) {
            x = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + offset + i)));
        } else if (dtype == DT_BF16) {
            __m256i h = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)src + offset + i)));
            x = _mm256_castsi256_ps(_mm256_slli_epi32(h, 16));
        } else {
            x = _mm256_loadu_ps((const float *)src + offset + i);
        }
        _mm256_storeu_ps(buf + i, x);
        vmn = _mm256_min_ps(vmn, x);
        vmx = _mm256_max_ps(vmx, x);
        __m256i e = _mm256_and_si256(_mm256_castps_si256(x), expmask);
        sp = _mm256_or_si256(sp, _mm256_cmpeq_epi32(e, expmask));
    }
    float a[8], b[8];
    _mm256_storeu_ps(a, vmn);
    _mm256_storeu_ps(b, vmx);
    float mn = a[0], mx = b[0];
    for (int j = 1; j < 8; j++) {
        mn = a[j] < mn ? a[j] : mn;
        mx = b[j] > mx ? b[j] : mx;
    }
    *mn_out = mn;
    *mx_out = mx;
    *special = !_mm256_testz_si256(sp, sp);
}
#endif

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
        float mn, mx;
        uint32_t special = 0;
#ifdef SWARM_AVX2
        if (count == group_size) {
            load_minmax_avx2(src, dtype, start, count, v, &mn, &mx, &special);
        } else
#endif
        {
            load_f32(src, dtype, start, count, v);
            mn = count ? v[0] : 0.0f;
            mx = mn;
            for (int64_t i = 0; i < count; i++) {
                float x = v[i];
                mn = x < mn ? x : mn;
                mx = x > mx ? x : mx;
                uint32_t e = bits_of(x) & 0x7F800000u;
                special |= (e == 0x7F800000u); /* exponent all ones: NaN or Inf */
            }
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
        } else {
            for (int64_t b = 0; b < group_size; b += 8) {
                uint64_t w;
                memcpy(&w, codes + b, 8);
                w = pack8(w, bits);
                memcpy(o, &w, (size_t)bits); /* little-endian hosts only (checked in Python) */
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
    const uint8_t *p = packed;
    for (int64_t g = 0; g < ng; g++) {
        if (bits == 8) {
            memcpy(codes, p, (size_t)group_size);
            p += group_size;
        } else {
            for (int64_t b = 0; b < group_size; b += 8) {
                uint64_t w = 0;
                memcpy(&w, p, (size_t)bits);
                p += bits;
                w = unpack8(w, bits);
                memcpy(codes + b, &w, 8);
            }
        }
        const int64_t start = g * group_size;
        int64_t count = n - start;
        if (count > group_size) count = group_size;
        const float lo = lo_in[g], scale = scale_in[g];
        if (out_dtype == DT_F16) {
            _Float16 *d = (_Float16 *)dst + start;
            int64_t i0 = 0;
#ifdef SWARM_AVX2
            const __m256 vs = _mm256_set1_ps(scale), vl = _mm256_set1_ps(lo);
            for (; i0 + 8 <= count; i0 += 8) {
                __m256i c32 = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(codes + i0)));
                __m256 x = _mm256_mul_ps(_mm256_cvtepi32_ps(c32), vs);
                x = _mm256_add_ps(x, vl);
                _mm_storeu_si128((__m128i *)(d + i0), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
            }
#endif
            for (int64_t i = i0; i < count; i++) {
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
