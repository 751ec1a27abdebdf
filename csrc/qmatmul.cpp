// Fused dequantize + matmul over packed quantized matrices; see qmatmul.h for the math and the format.
//
//   qlinear_f32: check arguments -> xsum[t, g] (group sums of x, once) -> split rows over the pool ->
//   per row: fp16 scales/zeros -> float s[g], sz[g] = s*z  ->  per block of <= 8 tokens:
//   acc[t] += (q[c] * s[c / G]) * x[t, c] over all columns, acc[t] -= sz . xsum[t]  ->  y[t, r]
//
// The scalar path is the readable C++ twin. The SIMD paths zero-extend one byte of the low plane per
// lane (a "superblock" of 8 or 16 bytes) and take its codes field by field with one shift each; x is
// permuted once per call so that field k meets the columns it holds (permute_x). AVX2 converts codes
// to float and multiplies by the scale; AVX-512 looks q * scale up in a 16-entry table (vpermps) and
// adds bit 2 of 3-bit codes under a lane mask. Accumulators (one vector per row and token, 1-4 rows
// by 1-8 tokens) stay in registers; the next block of rows is prefetched into L2.
#include "qmatmul.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>
#include <utility>

#include "bf16.h"
#include "common.h"
#include "thread_pool.h"

#if defined(__x86_64__)
#include <cpuid.h>
#include <immintrin.h>
#define MOE_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MOE_AVX512 __attribute__((target("avx512f,avx2,fma,f16c")))
#endif

namespace moe {
namespace {

constexpr int kTokenBlock = 8;                    // tokens whose accumulators stay in registers
constexpr int kMaxRowBlock = 4;                   // rows one SIMD kernel call computes at most
constexpr int64_t kMinWorkPerThread = 2 << 20;    // ~50 us of one thread (work = codes * (n + 1) / 2): waking
                                                  // a parked worker costs ~50 us in a VM, ~10 on bare metal

struct Problem {
  const float* x;      // [n, cols]
  const float* xp;     // [n, cols]: x with columns permuted for the SIMD path (permute_x), else x
  int64_t n;
  QMatrixView w;
  float* y;            // [n, rows]
  const float* xsum;   // [n, ngp] sum of x over each group, zero padded
  int64_t ng;          // groups per row (cols / group)
  int64_t ngp;         // ng rounded up to a multiple of 16
  int gshift;          // log2(group)
  int ahead;           // rows ahead of the current ones to prefetch (the SIMD row block)
};

// rows [r0, r1) of p.y; scratch: 2 * kMaxRowBlock * ngp + cols floats (converted scales, a decoded row).
using RowsFn = void (*)(const Problem&, int64_t r0, int64_t r1, float* scratch);
// tokens [t0, t0 + NT) of rows [r, r + RB); s, sz: [RB, ngp] converted scales and scale * zero.
using BlockFn = void (*)(const Problem&, int64_t r, int64_t t0, const float* s, const float* sz);

inline int low_bits(int bits) { return bits == 3 ? 2 : bits; }
inline const uint8_t* low_row(const Problem& p, int64_t r) {
  return p.w.planes[0] + r * p.w.cols * low_bits(p.w.bits) / 8;
}
inline const uint8_t* high_row(const Problem& p, int64_t r) {
  return p.w.bits == 3 ? p.w.planes[1] + r * p.w.cols / 8 : nullptr;
}
template <typename T>
inline T load_as(const void* ptr) {
  T v;
  std::memcpy(&v, ptr, sizeof(T));
  return v;
}

// xsum [n, ngp]: sums of x over each group of G columns, in a fixed order (the same for every path).
std::vector<float> group_sums(const float* x, int64_t n, int64_t cols, int group, int64_t ngp) {
  std::vector<float> out(n * ngp, 0.0f);
  for (int64_t t = 0; t < n; ++t) {
    for (int64_t g = 0; g < cols / group; ++g) {
      const float* xg = x + t * cols + g * group;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int c = 0; c < group; c += 8)
        for (int k = 0; k < 8; ++k) part[k] += xg[c + k];
      out[t * ngp + g] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
    }
  }
  return out;
}

// Converted scales s[g] and s[g] * zero[g] of row r, g < ngp; both are zero past ng.
void prep_scalar(const Problem& p, int64_t r, float* s, float* sz) {
  for (int64_t g = 0; g < p.ngp; ++g) {
    s[g] = g < p.ng ? half_to_float(p.w.scales[r * p.ng + g]) : 0.0f;
    sz[g] = g < p.ng ? s[g] * half_to_float(p.w.zeros[r * p.ng + g]) : 0.0f;
  }
}

// ------------------------------------------------------------------------------------ scalar twin

// ws [cols] = q[r, c] * s[c / G] of one row: each byte of the low plane holds `per` codes, lowest
// column in the lowest bits; for 3 bits, bit c % 8 of high-plane byte c / 8 is bit 2 of code c.
template <int BITS>
void decode_row(const Problem& p, int64_t r, const float* s, float* ws) {
  constexpr int w = BITS == 3 ? 2 : BITS, per = 8 / w;
  const uint8_t *lo = low_row(p, r), *hi = high_row(p, r);
  for (int64_t j = 0; j < p.w.cols / per; ++j) {
    for (int k = 0; k < per; ++k) {
      const int64_t c = j * per + k;
      int q = (lo[j] >> (k * w)) & ((1 << w) - 1);
      if (BITS == 3) q |= ((hi[c >> 3] >> (c & 7)) & 1) << 2;
      ws[c] = float(q) * s[c >> p.gshift];
    }
  }
}

template <int BITS>
void rows_scalar(const Problem& p, int64_t r0, int64_t r1, float* scratch) {
  const int64_t cols = p.w.cols;
  float *s = scratch, *sz = scratch + p.ngp, *ws = scratch + 2 * p.ngp;
  for (int64_t r = r0; r < r1; ++r) {
    prep_scalar(p, r, s, sz);
    decode_row<BITS>(p, r, s, ws);
    for (int64_t t = 0; t < p.n; ++t) {  // y = ws . x - sz . xsum, in 8 interleaved partial sums
      const float* x = p.x + t * cols;
      float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      for (int64_t c = 0; c < cols; c += 8)
        for (int k = 0; k < 8; ++k) part[k] += ws[c + k] * x[c + k];
      float acc = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      for (int64_t g = 0; g < p.ng; ++g) acc -= sz[g] * p.xsum[t * p.ngp + g];
      p.y[t * p.w.rows + r] = acc;
    }
  }
}

// xp [n, cols]: x with the columns of every superblock of per * lanes columns reordered so that
// xp[.., k * lanes + j] = x[.., j * per + k]: SIMD lane j of the zero-extended code bytes holds the `per`
// columns j * per .. j * per + per - 1, and its k-th field then meets the k-th run of lanes of xp.
std::vector<float> permute_x(const float* x, int64_t n, int64_t cols, int per, int lanes) {
  std::vector<float> xp(n * cols);
  const int64_t sb = int64_t(per) * lanes;
  for (int64_t t = 0; t < n; ++t)
    for (int64_t c0 = t * cols; c0 < (t + 1) * cols; c0 += sb)
      for (int k = 0; k < per; ++k)
        for (int j = 0; j < lanes; ++j) xp[c0 + k * lanes + j] = x[c0 + j * per + k];
  return xp;
}

#if defined(__x86_64__)
// Rows [r0, r1) in blocks of `wide` rows: token blocks of at most wide_max_nt tokens go to the wide
// kernels (more independent accumulators where there are few tokens), larger ones to the narrow
// kernels `wide / narrow` times; leftover rows one at a time. s, sz: [wide, ngp] in scratch.
struct Kernels {
  using Prep = void (*)(const Problem&, int64_t r, float* s, float* sz);  // like prep_scalar
  Prep prep;
  int wide, narrow, wide_max_nt;
  std::array<BlockFn, kTokenBlock> wide_fns, narrow_fns, single_fns;  // [NT - 1]
};

void rows_blocked(const Problem& p, int64_t r0, int64_t r1, float* scratch, const Kernels& k) {
  float *s = scratch, *sz = scratch + k.wide * p.ngp;
  int64_t r = r0;
  for (; r + k.wide <= r1; r += k.wide) {
    for (int i = 0; i < k.wide; ++i) k.prep(p, r + i, s + i * p.ngp, sz + i * p.ngp);
    for (int64_t t0 = 0; t0 < p.n; t0 += kTokenBlock) {
      const int nt = int(std::min<int64_t>(kTokenBlock, p.n - t0));
      if (nt <= k.wide_max_nt) {
        k.wide_fns[nt - 1](p, r, t0, s, sz);
        continue;
      }
      for (int i = 0; i < k.wide; i += k.narrow) k.narrow_fns[nt - 1](p, r + i, t0, s + i * p.ngp, sz + i * p.ngp);
    }
  }
  for (; r < r1; ++r) {
    k.prep(p, r, s, sz);
    for (int64_t t0 = 0; t0 < p.n; t0 += kTokenBlock)
      k.single_fns[std::min<int64_t>(kTokenBlock, p.n - t0) - 1](p, r, t0, s, sz);
  }
}

template <int BITS>
constexpr int kPer = 8 / (BITS == 3 ? 2 : BITS);  // codes per byte of the low plane

// Asks for the cache line at byte `at` of the low plane (and the matching high-plane bytes) of the rows
// p.ahead rows below lo[0..rb): the hardware prefetchers lose track where one block of rows ends.
inline void prefetch_rows(const Problem& p, const uint8_t* const* lo, const uint8_t* const* hi, int rb, int64_t at) {
  const int64_t lo_bytes = p.w.cols * low_bits(p.w.bits) / 8 * p.ahead, hi_bytes = p.w.cols / 8 * p.ahead;
  for (int i = 0; i < rb; ++i) {
    __builtin_prefetch(lo[i] + lo_bytes + at, 0, 2);
    if (hi[i] && at % 128 == 0) __builtin_prefetch(hi[i] + hi_bytes + at / 2, 0, 2);
  }
}

// 8 float16 values of row r from group g as floats, zero past ng. A partial vector is loaded whole when
// the array goes on past it (the lanes past ng are then zeroed) and otherwise built in registers (a
// load of a just-written temporary would stall on store forwarding, once per row).
MOE_AVX2 inline __m256 halves8(const Problem& p, const uint16_t* base, int64_t r, int64_t g) {
  const int64_t left = p.ng - g, at = r * p.ng + g;  // values of this row from g on
  if (left <= 0) return _mm256_setzero_ps();
  if (left >= 8 || at + 8 <= p.w.rows * p.ng) {
    const __m256 v = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(base + at)));
    const __m256i keep = _mm256_cmpgt_epi32(_mm256_set1_epi32(int(std::min<int64_t>(left, 8))),
                                            _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    return _mm256_and_ps(v, _mm256_castsi256_ps(keep));
  }
  uint16_t h[8];
  for (int i = 0; i < 8; ++i) h[i] = i < left ? base[at + i] : 0;
  return _mm256_cvtph_ps(_mm_setr_epi16(short(h[0]), short(h[1]), short(h[2]), short(h[3]), short(h[4]), short(h[5]),
                                        short(h[6]), short(h[7])));
}

// ------------------------------------------------------------------------------------ AVX2 + FMA + F16C
// Superblock: 8 bytes of the low plane (8 * per columns, at most 32, so never across a group).

MOE_AVX2 void prep_avx2(const Problem& p, int64_t r, float* s, float* sz) {
  for (int64_t g = 0; g < p.ngp; g += 8) {
    const __m256 sv = halves8(p, p.w.scales, r, g), zv = halves8(p, p.w.zeros, r, g);
    _mm256_storeu_ps(s + g, sv);
    _mm256_storeu_ps(sz + g, _mm256_mul_ps(sv, zv));
  }
}

// Field k of every lane: codes of columns j * per + k (j = lane), with bit 2 from `nib` for 3 bits.
template <int BITS>
MOE_AVX2 inline __m256i field8(__m256i z, __m256i nib, int k) {
  constexpr int w = BITS == 3 ? 2 : BITS;
  __m256i v = k > 0 ? _mm256_srli_epi32(z, k * w) : z;
  if ((k + 1) * w < 8) v = _mm256_and_si256(v, _mm256_set1_epi32((1 << w) - 1));
  if (BITS == 3) {  // bit k of nibble j is bit 2 of the code of column 4j + k
    const __m256i h = k < 2 ? _mm256_slli_epi32(nib, 2 - k) : _mm256_srli_epi32(nib, k - 2);
    v = _mm256_or_si256(v, _mm256_and_si256(h, _mm256_set1_epi32(4)));
  }
  return v;
}

MOE_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int BITS, int NT, int RB>
MOE_AVX2 void block_avx2(const Problem& p, int64_t r, int64_t t0, const float* s, const float* sz) {
  constexpr int per = kPer<BITS>, cols_sb = 8 * per;
  const int64_t cols = p.w.cols;
  const uint8_t *lo[RB], *hi[RB];
  for (int i = 0; i < RB; ++i) lo[i] = low_row(p, r + i), hi[i] = high_row(p, r + i);
  const float* x = p.xp + t0 * cols;  // [NT, cols], permuted
  __m256 acc[RB][NT];
#pragma GCC unroll 16
  for (int q = 0; q < RB * NT; ++q) acc[q / NT][q % NT] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < cols / cols_sb; ++sb) {
    if (sb % 8 == 0) prefetch_rows(p, lo, hi, RB, sb * 8);
    __m256i z[RB], nib[RB];
    __m256 sv[RB];
    for (int i = 0; i < RB; ++i) {
      z[i] = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(lo[i] + sb * 8)));
      nib[i] = BITS == 3 ? _mm256_srlv_epi32(_mm256_set1_epi32(load_as<int32_t>(hi[i] + sb * 4)),
                                             _mm256_setr_epi32(0, 4, 8, 12, 16, 20, 24, 28))
                         : _mm256_setzero_si256();
      sv[i] = _mm256_set1_ps(s[i * p.ngp + ((sb * cols_sb) >> p.gshift)]);
    }
#pragma GCC unroll 4
    for (int k = 0; k < per; ++k) {
      __m256 wv[RB];
      for (int i = 0; i < RB; ++i) wv[i] = _mm256_mul_ps(_mm256_cvtepi32_ps(field8<BITS>(z[i], nib[i], k)), sv[i]);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        const __m256 xv = _mm256_loadu_ps(x + t * cols + sb * cols_sb + k * 8);
        for (int i = 0; i < RB; ++i) acc[i][t] = _mm256_fmadd_ps(wv[i], xv, acc[i][t]);
      }
    }
  }
  for (int64_t g = 0; g < p.ngp; g += 8) {
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m256 xs = _mm256_loadu_ps(p.xsum + (t0 + t) * p.ngp + g);
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm256_fnmadd_ps(_mm256_loadu_ps(sz + i * p.ngp + g), xs, acc[i][t]);
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < RB * NT; ++q) p.y[(t0 + q % NT) * p.w.rows + r + q / NT] = hsum_avx2(acc[q / NT][q % NT]);
}

template <int BITS, int RB>
constexpr std::array<BlockFn, kTokenBlock> avx2_table() {
  return {block_avx2<BITS, 1, RB>, block_avx2<BITS, 2, RB>, block_avx2<BITS, 3, RB>, block_avx2<BITS, 4, RB>,
          block_avx2<BITS, 5, RB>, block_avx2<BITS, 6, RB>, block_avx2<BITS, 7, RB>, block_avx2<BITS, 8, RB>};
}

template <int BITS>
void rows_avx2(const Problem& p, int64_t r0, int64_t r1, float* scratch) {  // 16 ymm: 2 rows for <= 2 tokens
  static constexpr Kernels k{prep_avx2, 2, 1, 2, avx2_table<BITS, 2>(), avx2_table<BITS, 1>(), avx2_table<BITS, 1>()};
  rows_blocked(p, r0, r1, scratch, k);
}

// ------------------------------------------------------------------------------------ AVX-512F
// Superblock: 16 bytes of the low plane (16 * per columns). With 2/3-bit codes that is 64 columns,
// which spans two groups of 32: lanes 0-7 then take one group's scale and lanes 8-15 the next.

MOE_AVX512 inline __m512 join8(__m256 lo, __m256 hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_castps_pd(_mm512_castps256_ps512(lo)), _mm256_castps_pd(hi), 1));
}

MOE_AVX512 void prep_avx512(const Problem& p, int64_t r, float* s, float* sz) {
  int64_t g = 0;
  for (; g + 16 <= p.ng; g += 16) {
    const __m512 sv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.w.scales + r * p.ng + g)));
    const __m512 zv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.w.zeros + r * p.ng + g)));
    _mm512_storeu_ps(s + g, sv);
    _mm512_storeu_ps(sz + g, _mm512_mul_ps(sv, zv));
  }
  if (g < p.ngp) {  // the last partial vector and the padding: as the AVX2 path, 8 at a time
    const __m256 s0 = halves8(p, p.w.scales, r, g), s1 = halves8(p, p.w.scales, r, g + 8);
    const __m256 z0 = halves8(p, p.w.zeros, r, g), z1 = halves8(p, p.w.zeros, r, g + 8);
    _mm512_storeu_ps(s + g, join8(s0, s1));  // one 64-byte store: the kernel loads these with 64-byte loads
    _mm512_storeu_ps(sz + g, join8(_mm256_mul_ps(s0, z0), _mm256_mul_ps(s1, z1)));
  }
}

MOE_AVX512 inline __m512i high_nibbles16(const uint8_t* hi) {  // lane j: bits 4j..4j+3 of 8 bytes (and more)
  const __m128i rep2 = _mm_setr_epi8(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7);
  const __m128i b = _mm_shuffle_epi8(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(hi)), rep2);
  return _mm512_srlv_epi32(_mm512_cvtepu8_epi32(b), _mm512_set4_epi32(4, 0, 4, 0));
}

// One row's superblock, ready to decode: code bytes z (one per lane), for 3 bits the high nibbles, and
// the weights table: 8 bits: the per-lane scale (codes are converted and multiplied); 4 bits:
// table[i] = i * scale, looked up by the low 4 bits of each field; 2/3 bits: table[i] = (i % 4) * scale,
// or, when the superblock spans two groups, entries 0-3 for the first and 4-7 for the second group.
struct Super16 {
  __m512i z, nib;
  __m512 table, scale4;  // scale4: 4 * per-lane scale (bit 2 of 3-bit codes)
};

template <int BITS>
MOE_AVX512 inline Super16 load_super16(const uint8_t* lo, const uint8_t* hi, const float* s, bool split) {
  Super16 b;
  b.z = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(lo)));
  const __m512 lanes = split ? _mm512_mask_broadcastss_ps(_mm512_set1_ps(s[0]), 0xff00, _mm_load_ss(s + 1))
                             : _mm512_set1_ps(s[0]);
  if (BITS == 8) b.table = lanes;
  if (BITS == 4) b.table = _mm512_mul_ps(_mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15), lanes);
  if (BITS <= 3) {
    const __m512 entries = split ? _mm512_mask_broadcastss_ps(_mm512_set1_ps(s[0]), 0xfff0, _mm_load_ss(s + 1))
                                 : lanes;
    b.table = _mm512_mul_ps(_mm512_set4_ps(3, 2, 1, 0), entries);
  }
  b.nib = BITS == 3 ? high_nibbles16(hi) : _mm512_setzero_si512();
  b.scale4 = BITS == 3 ? _mm512_mul_ps(lanes, _mm512_set1_ps(4.0f)) : _mm512_setzero_ps();
  return b;
}

// Weights q * scale of field k: lane j -> column j * per + k of the superblock.
template <int BITS>
MOE_AVX512 inline __m512 weights16(const Super16& b, int k, bool split) {
  constexpr int w = BITS == 3 ? 2 : BITS;
  const __m512i f = k > 0 ? _mm512_srli_epi32(b.z, unsigned(k * w)) : b.z;  // field k in the low bits
  if (BITS == 8) return _mm512_mul_ps(_mm512_cvtepi32_ps(f), b.table);
  if (BITS == 4) return _mm512_permutexvar_ps(f, b.table);  // uses the low 4 bits of f only
  // 2/3 bits: bits 0-1 of f are the code, bits 2-3 the next field, which table[i % 4] ignores; when
  // split, bits 2.. become the lane's group instead (0 for lanes 0-7, 4 for 8-15): f & 3 | group.
  const __m512i group4 = _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i idx = split ? _mm512_ternarylogic_epi32(f, group4, _mm512_set1_epi32(3), 0xe4) : f;  // 3 ? f : g4
  __m512 v = _mm512_permutexvar_ps(idx, b.table);
  if (BITS == 3) v = _mm512_mask_add_ps(v, _mm512_test_epi32_mask(b.nib, _mm512_set1_epi32(1 << k)), v, b.scale4);
  return v;
}

template <int BITS, int NT, int RB>
MOE_AVX512 void block_avx512(const Problem& p, int64_t r, int64_t t0, const float* s, const float* sz) {
  constexpr int per = kPer<BITS>, cols_sb = 16 * per;
  const int64_t cols = p.w.cols;
  const bool split = cols_sb > p.w.group;  // 64 columns over groups of 32
  const uint8_t *lo[RB], *hi[RB];
  for (int i = 0; i < RB; ++i) lo[i] = low_row(p, r + i), hi[i] = high_row(p, r + i);
  const float* x = p.xp + t0 * cols;  // [NT, cols], permuted
  __m512 acc[RB][NT];
#pragma GCC unroll 16
  for (int q = 0; q < RB * NT; ++q) acc[q / NT][q % NT] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < cols / cols_sb; ++sb) {
    if (sb % 4 == 0) prefetch_rows(p, lo, hi, RB, sb * 16);
    Super16 b[RB];
    for (int i = 0; i < RB; ++i)
      b[i] = load_super16<BITS>(lo[i] + sb * 16, BITS == 3 ? hi[i] + sb * 8 : nullptr,
                                s + i * p.ngp + ((sb * cols_sb) >> p.gshift), split);
#pragma GCC unroll 4
    for (int k = 0; k < per; ++k) {
      __m512 wv[RB];
      for (int i = 0; i < RB; ++i) wv[i] = weights16<BITS>(b[i], k, split);
#pragma GCC unroll 8
      for (int t = 0; t < NT; ++t) {
        const __m512 xv = _mm512_loadu_ps(x + t * cols + sb * cols_sb + k * 16);
        for (int i = 0; i < RB; ++i) acc[i][t] = _mm512_fmadd_ps(wv[i], xv, acc[i][t]);
      }
    }
  }
  for (int64_t g = 0; g < p.ngp; g += 16) {
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512 xs = _mm512_loadu_ps(p.xsum + (t0 + t) * p.ngp + g);
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm512_fnmadd_ps(_mm512_loadu_ps(sz + i * p.ngp + g), xs, acc[i][t]);
    }
  }
#pragma GCC unroll 16
  for (int q = 0; q < RB * NT; ++q)
    p.y[(t0 + q % NT) * p.w.rows + r + q / NT] = _mm512_reduce_add_ps(acc[q / NT][q % NT]);
}

template <int BITS, int RB>
constexpr std::array<BlockFn, kTokenBlock> avx512_table() {
  return {block_avx512<BITS, 1, RB>, block_avx512<BITS, 2, RB>, block_avx512<BITS, 3, RB>, block_avx512<BITS, 4, RB>,
          block_avx512<BITS, 5, RB>, block_avx512<BITS, 6, RB>, block_avx512<BITS, 7, RB>, block_avx512<BITS, 8, RB>};
}

template <int BITS>
void rows_avx512(const Problem& p, int64_t r0, int64_t r1, float* scratch) {  // 32 zmm: 4 rows for <= 2 tokens
  static constexpr Kernels k{prep_avx512, 4, 2, 2, avx512_table<BITS, 4>(), avx512_table<BITS, 2>(),
                             avx512_table<BITS, 1>()};
  rows_blocked(p, r0, r1, scratch, k);
}

bool cpu_has_avx2() {
  unsigned a = 0, b = 0, c = 0, d = 0;
  const bool f16c = __get_cpuid(1, &a, &b, &c, &d) && (c & bit_F16C);
  __builtin_cpu_init();
  return f16c && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
bool cpu_has_avx512() { return cpu_has_avx2() && __builtin_cpu_supports("avx512f"); }
#endif  // __x86_64__

// ------------------------------------------------------------------------------------ dispatch

int simd_lanes(const std::string& isa) { return isa == "avx512" ? 16 : isa == "avx2" ? 8 : 0; }

RowsFn rows_fn([[maybe_unused]] const std::string& isa, int bits) {
#if defined(__x86_64__)
  if (isa == "avx512") {
    return bits == 8 ? rows_avx512<8> : bits == 4 ? rows_avx512<4> : bits == 3 ? rows_avx512<3> : rows_avx512<2>;
  }
  if (isa == "avx2") {
    return bits == 8 ? rows_avx2<8> : bits == 4 ? rows_avx2<4> : bits == 3 ? rows_avx2<3> : rows_avx2<2>;
  }
#endif
  return bits == 8 ? rows_scalar<8> : bits == 4 ? rows_scalar<4> : bits == 3 ? rows_scalar<3> : rows_scalar<2>;
}

std::vector<std::string> float_isas() {
  static const std::vector<std::string> isas = [] {  // cpuid traps to the hypervisor in a VM: ask once
    std::vector<std::string> out;
#if defined(__x86_64__)
    if (cpu_has_avx512()) out.push_back("avx512");
    if (cpu_has_avx2()) out.push_back("avx2");
#endif
    out.push_back("scalar");
    return out;
  }();
  return isas;
}

std::string pick_isa(const std::string& isa) {
  const std::vector<std::string> ok = qlinear_isas();
  if (isa == "auto") return ok.front();
  if (std::find(ok.begin(), ok.end(), isa) != ok.end()) return isa;
  std::ostringstream names;
  for (const auto& n : ok) names << " '" << n << "'";
  MOE_CHECK(false, "qlinear: isa '" << isa << "' is not available on this CPU; use 'auto' or one of" << names.str());
  return "";
}

void check_args(const float* x, int64_t n, const QMatrixView& w, const float* y) {
  MOE_CHECK(w.bits == 2 || w.bits == 3 || w.bits == 4 || w.bits == 8,
            "qlinear: bits must be 2, 3, 4 or 8, got " << w.bits);
  MOE_CHECK(w.group == 32 || w.group == 64 || w.group == 128, "qlinear: group must be 32, 64 or 128, got " << w.group);
  MOE_CHECK(w.cols > 0 && w.cols % w.group == 0,
            "qlinear: cols must be a positive multiple of the group size " << w.group << ", got " << w.cols);
  MOE_CHECK(w.rows >= 0 && n >= 0, "qlinear: rows and n must be >= 0, got rows=" << w.rows << " n=" << n);
  if (n == 0 || w.rows == 0) return;
  MOE_CHECK(x && y, "qlinear: x and y must be non-null pointers");
  MOE_CHECK((w.planes[1] != nullptr) == (w.bits == 3),
            "qlinear: " << w.bits << "-bit codes are stored in " << (w.bits == 3 ? 2 : 1) << " bit plane(s), got "
                        << (w.planes[1] ? 2 : 1) << " plane pointers");
  MOE_CHECK(w.planes[0], "qlinear: null plane pointer");
  MOE_CHECK(w.scales && w.zeros, "qlinear: scales and zeros must be non-null pointers");
}

// The float path of one product (2/3-bit codes): x permuted and group sums taken once.
struct FloatJob final : QLinearJob {
  std::vector<float> xsum, xp;
  Problem p{};
  RowsFn fn = nullptr;
  void rows(int64_t r0, int64_t r1, float* scratch) const override { fn(p, r0, r1, scratch); }
};

std::unique_ptr<QLinearJob> make_float_job(const float* x, int64_t n, const QMatrixView& w, float* y,
                                           std::string path) {
  if (path == "avx512vnni") path = "avx512";
  if (path == "avxvnni") path = "avx2";
  if (path == "avx512" && w.bits <= 3 && w.cols % 64) path = "avx2";  // 64-column superblocks must tile a row
  auto job = std::make_unique<FloatJob>();
  job->fn = rows_fn(path, w.bits);
  const int64_t ng = w.cols / w.group, ngp = round_up(size_t(ng), 16);
  job->xsum = group_sums(x, n, w.cols, w.group, ngp);
  const int per = 8 / low_bits(w.bits), lanes = simd_lanes(path);
  if (per > 1 && lanes > 0) job->xp = permute_x(x, n, w.cols, per, lanes);
  job->p = Problem{x, job->xp.empty() ? x : job->xp.data(), n, w, y, job->xsum.data(), ng, ngp,
                   __builtin_ctz(unsigned(w.group)), lanes == 16 ? 4 : 2};
  job->num_rows = w.rows;
  job->scratch_floats = 2 * kMaxRowBlock * ngp + w.cols;
  job->work = w.rows * w.cols * (n + 1) / 2;  // measured: time ~ codes * (n + 1) up to 8 tokens
  return job;
}

}  // namespace

std::vector<std::string> qlinear_isas() {
  static const std::vector<std::string> isas = [] {
    std::vector<std::string> out = qdot_isas();   // a superset of the float path's
    for (const auto& i : float_isas())
      if (std::find(out.begin(), out.end(), i) == out.end()) out.insert(out.end() - 1, i);
    return out;
  }();
  return isas;
}

std::unique_ptr<QLinearJob> make_qlinear_job(const float* x, int64_t n, const QMatrixView& w, float* y,
                                             const std::string& isa, bool int8_acts) {
  check_args(x, n, w, y);
  const std::string path = pick_isa(isa);
  if (int8_acts && (w.bits == 4 || w.bits == 8)) return make_qdot_job(x, n, w, y, path);
  return make_float_job(x, n, w, y, path);
}

void run_qlinear_jobs(const std::vector<const QLinearJob*>& jobs, int num_threads) {
  MOE_CHECK(num_threads >= 1 && num_threads <= 1024, "qlinear: num_threads must be in 1..1024, got " << num_threads);
  int64_t work = 0, rows = 0, scratch = 0;
  for (const QLinearJob* j : jobs) {
    if (j->num_rows == 0) continue;
    work += j->work, rows += j->num_rows, scratch = std::max(scratch, j->scratch_floats);
  }
  if (rows == 0) return;
  const int64_t threads = std::clamp<int64_t>(std::min(work / kMinWorkPerThread, rows / kMaxRowBlock), 1,
                                              num_threads);
  // Threads take chunks of whole row blocks from a shared counter, about 8 per thread: a thread that
  // shares its core (torch's OpenMP workers spin for a while after each parallel op) then does less.
  const int64_t chunk = round_up(size_t(std::max<int64_t>(1, rows / (threads * 8))), kMaxRowBlock);
  struct Chunk { const QLinearJob* job; int64_t r0, r1; };
  std::vector<Chunk> chunks;
  for (const QLinearJob* j : jobs)
    for (int64_t r0 = 0; r0 < j->num_rows; r0 += chunk) chunks.push_back({j, r0, std::min(j->num_rows, r0 + chunk)});
  std::vector<float> buf(size_t(threads * scratch));
  std::atomic<int64_t> next{0};
  const int64_t total = int64_t(chunks.size());
  pool().run(int(threads), [&](int i) {
    for (int64_t c = next.fetch_add(1); c < total; c = next.fetch_add(1))
      chunks[size_t(c)].job->rows(chunks[size_t(c)].r0, chunks[size_t(c)].r1, buf.data() + i * scratch);
  });
}

void qlinear_f32(const float* x, int64_t n, const QMatrixView& w, float* y, int num_threads, const std::string& isa,
                 bool int8_acts) {
  MOE_CHECK(num_threads >= 1 && num_threads <= 1024, "qlinear: num_threads must be in 1..1024, got " << num_threads);
  const std::unique_ptr<QLinearJob> job = make_qlinear_job(x, n, w, y, isa, int8_acts);
  if (n == 0 || w.rows == 0) return;
  run_qlinear_jobs({job.get()}, num_threads);
}

}  // namespace moe
