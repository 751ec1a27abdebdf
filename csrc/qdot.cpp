// The integer path of qlinear_f32 for 4- and 8-bit codes (see qmatmul.h for the format):
//
//   make_qdot_job: per token and block b of 32 columns: d[t, b] = max|x| / 127, xq = round-half-even(x / d)
//                  (int8; d = 0 gives 0), bsum = sum of xq; xq laid out to meet the codes as the path loads them;
//                  xz[t, g] = sum over the blocks b of group g of d[t, b] * bsum[t, b]
//   rows:          y[t, r] = sum_b s[r, g(b)] * d[t, b] * isum[t, r, b]  -  sum_g s[r, g] * z[r, g] * xz[t, g]
//                  isum[t, r, b] = sum over the block's columns of q[r, c] * xq[t, c]      (an exact integer)
//
// The SIMD paths keep one int32 lane per 4 code bytes: a lane never mixes blocks, so after the integer dot
// (vpdpbusd with VNNI, else vpmaddubsw + vpmaddwd) each lane is scaled by its block's s * d and summed in float32
// lanes; one horizontal sum per row and token at the end. 4-bit codes: the low nibbles of a superblock's bytes
// are its even columns and the high nibbles the odd ones, so xq is stored per superblock of S blocks (S = 4 for
// AVX-512, 2 for AVX2, 1 scalar) as [even columns of the S blocks | odd columns]. 8-bit codes without VNNI are
// taken as signed q - 128 (vpmaddubsw multiplies unsigned by signed bytes and would saturate on 255 * 127 * 2);
// the zero-point term then uses z - 128, which gives the same value.
#include <algorithm>
#include <array>
#include <cmath>
#include <cstring>

#include "bf16.h"
#include "common.h"
#include "qmatmul.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define MOE_QD_AVX2 __attribute__((target("avx2,fma,f16c")))
#define MOE_QD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx2,fma,f16c")))
#endif

namespace moe {
namespace {

constexpr int kBlock = 32;          // columns per activation scale
constexpr int kTokens = 8;          // tokens whose accumulators stay in registers
constexpr int64_t kPrefetchAhead = 8192;  // bytes ahead of each row being read, prefetched into L1 (prefetcht0).
                                          // Measured on the Intel VM, int4 7168 x 1024 matrices from DRAM: into L1
                                          // 8 KiB ahead 8.5 GB/s per thread, 16-32 KiB 8 GB/s, into L2 (t1) 2-32
                                          // KiB 7-8, non-temporal 6, none 3.9: the kernel spends ~4x the
                                          // instructions per byte of a bf16 GEMV, so the out-of-order window alone
                                          // keeps too few lines in flight

struct QDot;
// tokens [t0, t0 + NT) of rows [r, r + RB); s, sz: [RB, stride] the rows' scales and scale * zero (floats)
using QBlockFn = void (*)(const QDot&, int64_t r, int64_t t0, const float* s, const float* sz);
using QPrepFn = void (*)(const QDot&, int64_t r, float* s, float* sz);

struct QKernels {
  QPrepFn prep;
  int wide, narrow, wide_max_nt;                                    // as qmatmul.cpp's Kernels
  std::array<QBlockFn, kTokens> wide_fns, narrow_fns, single_fns;   // [NT - 1]
};

struct QDot final : QLinearJob {
  QMatrixView w;
  const float* x = nullptr;
  int64_t n = 0, cols = 0, nb = 0, ng = 0, ngp = 0, lanes = 0, row_bytes = 0;
  int64_t stride = 0;                  // floats per row of the converted scales: ngp + 16 (a vector past ngp)
  int32_t lane_group[16] = {};         // SIMD lane -> its group's offset from the superblock's first group
  int gshift = 0, lpb = 0, span = 1;   // lanes per block; blocks per superblock (4-bit layout)
  bool shifted = false;                // 8-bit codes taken as q - 128
  float* y = nullptr;
  std::vector<int8_t> xq;              // [n, cols], laid out for the path
  std::vector<float> d;                // [n, nb]
  std::vector<int32_t> bsum;           // [n, nb]
  std::vector<float> xl;               // [n, lanes]: d of each lane's block (SIMD paths)
  std::vector<float> xz;               // [n, ngp], zero padded
  const QKernels* kernels = nullptr;   // null: scalar

  void prep(int64_t r, float* s, float* sz) const;
  void rows(int64_t r0, int64_t r1, float* scratch) const override;
  void rows_scalar(int64_t r0, int64_t r1, float* scratch) const;
};

// Scales s[g] and s[g] * (z[g] - shift) of row r as floats, zero from ng to stride.
void QDot::prep(int64_t r, float* s, float* sz) const {
  const float zshift = shifted ? 128.0f : 0.0f;
  for (int64_t g = 0; g < stride; ++g) {
    s[g] = g < ng ? half_to_float(w.scales[r * ng + g]) : 0.0f;
    sz[g] = g < ng ? s[g] * (half_to_float(w.zeros[r * ng + g]) - zshift) : 0.0f;
  }
}

// The readable twin: per block, the exact integer dot, scaled in float32 in block order.
void QDot::rows_scalar(int64_t r0, int64_t r1, float* scratch) const {
  float *s = scratch, *sz = scratch + stride;
  for (int64_t r = r0; r < r1; ++r) {
    prep(r, s, sz);
    const uint8_t* codes = w.planes[0] + r * row_bytes;
    for (int64_t t = 0; t < n; ++t) {
      const int8_t* xt = xq.data() + t * cols;
      float acc = 0.0f;
      for (int64_t b = 0; b < nb; ++b) {
        int32_t isum = 0;
        if (w.bits == 8) {
          for (int c = 0; c < kBlock; ++c) isum += int32_t(codes[b * kBlock + c]) * xt[b * kBlock + c];
          if (shifted) isum -= 128 * bsum[size_t(t * nb + b)];
        } else {  // span 1: [16 even | 16 odd] per block
          for (int j = 0; j < 16; ++j) {
            const uint8_t v = codes[b * 16 + j];
            isum += int32_t(v & 15) * xt[b * kBlock + j] + int32_t(v >> 4) * xt[b * kBlock + 16 + j];
          }
        }
        acc += s[(b * kBlock) >> gshift] * d[size_t(t * nb + b)] * float(isum);
      }
      for (int64_t g = 0; g < ng; ++g) acc -= sz[g] * xz[size_t(t * ngp + g)];
      y[t * w.rows + r] = acc;
    }
  }
}

void QDot::rows(int64_t r0, int64_t r1, float* scratch) const {
  if (!kernels) return rows_scalar(r0, r1, scratch);
  const QKernels& k = *kernels;
  float *s = scratch, *sz = scratch + k.wide * stride;
  int64_t r = r0;
  for (; r + k.wide <= r1; r += k.wide) {
    for (int i = 0; i < k.wide; ++i) k.prep(*this, r + i, s + i * stride, sz + i * stride);
    for (int64_t t0 = 0; t0 < n; t0 += kTokens) {
      const int nt = int(std::min<int64_t>(kTokens, n - t0));
      if (nt <= k.wide_max_nt) {
        k.wide_fns[nt - 1](*this, r, t0, s, sz);
        continue;
      }
      for (int i = 0; i < k.wide; i += k.narrow)
        k.narrow_fns[nt - 1](*this, r + i, t0, s + i * stride, sz + i * stride);
    }
  }
  for (; r < r1; ++r) {
    k.prep(*this, r, s, sz);
    for (int64_t t0 = 0; t0 < n; t0 += kTokens)
      k.single_fns[std::min<int64_t>(kTokens, n - t0) - 1](*this, r, t0, s, sz);
  }
}

#if defined(__x86_64__)
// ------------------------------------------------------------------------------------ AVX-512 (BW, VNNI)
// Superblock: 64 code bytes (8 bits: 64 columns, 2 blocks; 4 bits: 128 columns, 4 blocks), 16 int32 lanes.

// Row r's scales and scale * (zero - shift), 16 groups per step (masked loads past ng: no read beyond the row).
MOE_QD_AVX512 void prep512(const QDot& p, int64_t r, float* s, float* sz) {
  const __m512 shift = _mm512_set1_ps(p.shifted ? 128.0f : 0.0f);
  __builtin_prefetch(p.w.scales + (r + 32) * p.ng, 0, 2);   // the scale and zero streams, 32 rows ahead
  __builtin_prefetch(p.w.zeros + (r + 32) * p.ng, 0, 2);
  for (int64_t g = 0; g < p.stride; g += 16) {
    const int64_t left = std::clamp<int64_t>(p.ng - g, 0, 16);
    const __mmask16 m = __mmask16((1u << left) - 1u);
    const __m512 sv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.w.scales + r * p.ng + g));
    const __m512 zv = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p.w.zeros + r * p.ng + g));
    _mm512_storeu_ps(s + g, sv);
    _mm512_storeu_ps(sz + g, _mm512_maskz_mul_ps(m, sv, _mm512_sub_ps(zv, shift)));
  }
}

template <int BITS, bool VNNI>
struct Codes512 {   // one row's superblock, ready for the dot products
  __m512i a, b;     // 4 bits: low / high nibbles; 8 bits: codes (VNNI) or |q - 128| (a) with b unused
  __mmask64 neg;    // 8 bits without VNNI: lanes where q - 128 < 0
};

template <int BITS, bool VNNI>
MOE_QD_AVX512 inline Codes512<BITS, VNNI> load512(const uint8_t* p) {
  Codes512<BITS, VNNI> c{};
  const __m512i v = _mm512_loadu_si512(p);
  if (BITS == 4) {
    const __m512i m = _mm512_set1_epi8(15);
    c.a = _mm512_and_si512(v, m);
    c.b = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
  } else if (VNNI) {
    c.a = v;
  } else {
    const __m512i sq = _mm512_xor_si512(v, _mm512_set1_epi8(char(0x80)));
    c.neg = _mm512_movepi8_mask(sq);
    c.a = _mm512_abs_epi8(sq);
  }
  return c;
}

// int32 lanes: each the sum of 4 (8 bits) or 8 (4 bits: 4 even + 4 odd columns) products of one block
template <int BITS, bool VNNI>
MOE_QD_AVX512 inline __m512i dot512(const Codes512<BITS, VNNI>& c, __m512i xa, __m512i xb) {
  if (VNNI) {
    __m512i acc = _mm512_dpbusd_epi32(_mm512_setzero_si512(), c.a, xa);
    if (BITS == 4) acc = _mm512_dpbusd_epi32(acc, c.b, xb);
    return acc;
  }
  const __m512i ones = _mm512_set1_epi16(1);
  if (BITS == 4)  // |products| <= 15 * 127 * 2 per pair: no saturation, nor in the sum of both halves
    return _mm512_madd_epi16(_mm512_add_epi16(_mm512_maddubs_epi16(c.a, xa), _mm512_maddubs_epi16(c.b, xb)), ones);
  const __m512i sx = _mm512_mask_sub_epi8(xa, c.neg, _mm512_setzero_si512(), xa);  // x * sign(q - 128)
  return _mm512_madd_epi16(_mm512_maddubs_epi16(c.a, sx), ones);
}

template <int BITS, bool VNNI, int NT, int RB>
MOE_QD_AVX512 void block512(const QDot& p, int64_t r, int64_t t0, const float* s, const float* sz) {
  constexpr int cols_sb = BITS == 4 ? 128 : 64;
  const __m512i lane_group = _mm512_loadu_si512(p.lane_group);
  const int64_t nsb = p.cols / cols_sb;
  const uint8_t* row[RB];
  for (int i = 0; i < RB; ++i) row[i] = p.w.planes[0] + (r + i) * p.row_bytes;
  const int8_t* x = p.xq.data() + t0 * p.cols;
  const float* xl = p.xl.data() + t0 * p.lanes;
  __m512 acc[RB][NT];
#pragma GCC unroll 32
  for (int q = 0; q < RB * NT; ++q) acc[q / NT][q % NT] = _mm512_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    Codes512<BITS, VNNI> c[RB];
    __m512 wv[RB];
    for (int i = 0; i < RB; ++i) {
      __builtin_prefetch(row[i] + kPrefetchAhead + sb * 64, 0, 3);
      c[i] = load512<BITS, VNNI>(row[i] + sb * 64);
      wv[i] = _mm512_permutexvar_ps(lane_group, _mm512_loadu_ps(s + i * p.stride + ((sb * cols_sb) >> p.gshift)));
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const int8_t* xt = x + t * p.cols + sb * cols_sb;
      const __m512i xa = _mm512_loadu_si512(xt);
      const __m512i xb = BITS == 4 ? _mm512_loadu_si512(xt + 64) : xa;
      const __m512 dv = _mm512_loadu_ps(xl + t * p.lanes + sb * 16);
      for (int i = 0; i < RB; ++i)
        acc[i][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot512<BITS, VNNI>(c[i], xa, xb)), _mm512_mul_ps(wv[i], dv),
                                    acc[i][t]);
    }
  }
  for (int64_t g = 0; g < p.ngp; g += 16) {
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512 xz = _mm512_loadu_ps(p.xz.data() + (t0 + t) * p.ngp + g);
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm512_fnmadd_ps(_mm512_loadu_ps(sz + i * p.stride + g), xz, acc[i][t]);
    }
  }
#pragma GCC unroll 32
  for (int q = 0; q < RB * NT; ++q) p.y[(t0 + q % NT) * p.w.rows + r + q / NT] = _mm512_reduce_add_ps(acc[q / NT][q % NT]);
}

template <int BITS, bool VNNI, int RB>
constexpr std::array<QBlockFn, kTokens> table512() {
  return {block512<BITS, VNNI, 1, RB>, block512<BITS, VNNI, 2, RB>, block512<BITS, VNNI, 3, RB>,
          block512<BITS, VNNI, 4, RB>, block512<BITS, VNNI, 5, RB>, block512<BITS, VNNI, 6, RB>,
          block512<BITS, VNNI, 7, RB>, block512<BITS, VNNI, 8, RB>};
}

template <int BITS, bool VNNI>
const QKernels kernels512{prep512, 4, 2, 2, table512<BITS, VNNI, 4>(), table512<BITS, VNNI, 2>(), table512<BITS, VNNI, 1>()};

// ------------------------------------------------------------------------------------ AVX2
// Superblock: 32 code bytes (8 bits: 32 columns, 1 block; 4 bits: 64 columns, 2 blocks), 8 int32 lanes.

MOE_QD_AVX2 void prep256(const QDot& p, int64_t r, float* s, float* sz) {
  const __m256 shift = _mm256_set1_ps(p.shifted ? 128.0f : 0.0f);
  int64_t g = 0;
  for (; g + 8 <= p.ng; g += 8) {
    const __m256 sv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w.scales + r * p.ng + g)));
    const __m256 zv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p.w.zeros + r * p.ng + g)));
    _mm256_storeu_ps(s + g, sv);
    _mm256_storeu_ps(sz + g, _mm256_mul_ps(sv, _mm256_sub_ps(zv, shift)));
  }
  for (; g < p.stride; ++g) {   // the rest one by one (inline: calling QDot::prep here, code compiled without AVX,
                                // made the AVX2 kernels 3-4x slower)
    s[g] = g < p.ng ? half_to_float(p.w.scales[r * p.ng + g]) : 0.0f;
    sz[g] = g < p.ng ? s[g] * (half_to_float(p.w.zeros[r * p.ng + g]) - (p.shifted ? 128.0f : 0.0f)) : 0.0f;
  }
}

// acc += dot of 4 unsigned bytes of a and 4 signed bytes of b per int32 lane. Written as the VEX instruction itself:
// the intrinsic needs the whole function compiled for "avxvnni", which (GCC 12) made the AVX2 kernels ~4x slower.
MOE_QD_AVX2 inline void vpdpbusd_vex(__m256i& acc, __m256i a, __m256i b) {
  asm("%{vex%} vpdpbusd %2, %1, %0" : "+x"(acc) : "x"(a), "x"(b));
}

template <int BITS, bool VNNI>
MOE_QD_AVX2 inline __m256i dot256(__m256i ca, __m256i cb, __m256i xa, __m256i xb) {
  if (VNNI) {   // AVX-VNNI (VEX vpdpbusd): unsigned codes (8 bits: as stored, not shifted) times signed x
    __m256i acc = _mm256_setzero_si256();
    vpdpbusd_vex(acc, ca, xa);
    if (BITS == 4) vpdpbusd_vex(acc, cb, xb);
    return acc;
  }
  const __m256i ones = _mm256_set1_epi16(1);
  if (BITS == 4)
    return _mm256_madd_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(ca, xa), _mm256_maddubs_epi16(cb, xb)), ones);
  // ca = q - 128 (signed): |q - 128| * (x * sign(q - 128))
  return _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(ca), _mm256_sign_epi8(xa, ca)), ones);
}

template <int BITS, bool VNNI, int NT, int RB>
MOE_QD_AVX2 void block256(const QDot& p, int64_t r, int64_t t0, const float* s, const float* sz) {
  constexpr int cols_sb = BITS == 4 ? 64 : 32;
  const __m256i lane_group = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.lane_group));
  const int64_t nsb = p.cols / cols_sb;
  const uint8_t* row[RB];
  for (int i = 0; i < RB; ++i) row[i] = p.w.planes[0] + (r + i) * p.row_bytes;
  const int8_t* x = p.xq.data() + t0 * p.cols;
  const float* xl = p.xl.data() + t0 * p.lanes;
  __m256 acc[RB][NT];
#pragma GCC unroll 32
  for (int q = 0; q < RB * NT; ++q) acc[q / NT][q % NT] = _mm256_setzero_ps();
  for (int64_t sb = 0; sb < nsb; ++sb) {
    __m256i ca[RB], cb[RB];
    __m256 wv[RB];
    for (int i = 0; i < RB; ++i) {
      if (sb % 2 == 0) __builtin_prefetch(row[i] + kPrefetchAhead + sb * 32, 0, 3);
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row[i] + sb * 32));
      if (BITS == 4) {
        const __m256i m = _mm256_set1_epi8(15);
        ca[i] = _mm256_and_si256(v, m);
        cb[i] = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
      } else {
        ca[i] = VNNI ? v : _mm256_xor_si256(v, _mm256_set1_epi8(char(0x80)));
        cb[i] = ca[i];
      }
      wv[i] = _mm256_permutevar8x32_ps(_mm256_loadu_ps(s + i * p.stride + ((sb * cols_sb) >> p.gshift)), lane_group);
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const int8_t* xt = x + t * p.cols + sb * cols_sb;
      const __m256i xa = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt));
      const __m256i xb = BITS == 4 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xt + 32)) : xa;
      const __m256 dv = _mm256_loadu_ps(xl + t * p.lanes + sb * 8);
      for (int i = 0; i < RB; ++i)
        acc[i][t] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot256<BITS, VNNI>(ca[i], cb[i], xa, xb)), _mm256_mul_ps(wv[i], dv),
                                    acc[i][t]);
    }
  }
  for (int64_t g = 0; g < p.ngp; g += 8) {
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m256 xz = _mm256_loadu_ps(p.xz.data() + (t0 + t) * p.ngp + g);
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm256_fnmadd_ps(_mm256_loadu_ps(sz + i * p.stride + g), xz, acc[i][t]);
    }
  }
#pragma GCC unroll 32
  for (int q = 0; q < RB * NT; ++q) {
    const __m256 v = acc[q / NT][q % NT];
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    p.y[(t0 + q % NT) * p.w.rows + r + q / NT] = _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
  }
}

template <int BITS, bool VNNI, int RB>
constexpr std::array<QBlockFn, kTokens> table256() {
  return {block256<BITS, VNNI, 1, RB>, block256<BITS, VNNI, 2, RB>, block256<BITS, VNNI, 3, RB>,
          block256<BITS, VNNI, 4, RB>, block256<BITS, VNNI, 5, RB>, block256<BITS, VNNI, 6, RB>,
          block256<BITS, VNNI, 7, RB>, block256<BITS, VNNI, 8, RB>};
}

template <int BITS, bool VNNI>
const QKernels kernels256{prep256, 2, 1, 2, table256<BITS, VNNI, 2>(), table256<BITS, VNNI, 1>(),
                          table256<BITS, VNNI, 1>()};

bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
bool has_avxvnni() { return has_avx2() && __builtin_cpu_supports("avxvnni"); }
bool has_avx512bw() {
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw");
}
bool has_avx512vnni() { return has_avx512bw() && __builtin_cpu_supports("avx512vnni"); }
#endif  // __x86_64__

// The path that takes this shape: isa as asked, or the next one down when cols does not tile its superblocks.
std::string fit_isa(std::string isa, int64_t cols, int bits) {
  if ((isa == "avx512vnni" || isa == "avx512") && cols % 128) {
    const std::vector<std::string>& ok = qdot_isas();   // asked once (cpuid traps to the hypervisor in a VM)
    isa = std::find(ok.begin(), ok.end(), "avxvnni") != ok.end() ? "avxvnni" : "avx2";
  }
  if ((isa == "avxvnni" || isa == "avx2") && cols % (bits == 4 ? 64 : 32)) isa = "scalar";
  return isa;
}

// xq [n, cols] laid out for `span` blocks per superblock (4 bits; 8 bits: as is), d, bsum, and xz.
void quantize_acts(QDot& p) {
  p.xq.assign(size_t(p.n * p.cols), 0);
  p.d.assign(size_t(p.n * p.nb), 0.0f);
  p.bsum.assign(size_t(p.n * p.nb), 0);
  p.xz.assign(size_t(p.n * p.ngp), 0.0f);
  std::vector<int8_t> q(kBlock);
  const int64_t sb_cols = int64_t(kBlock) * p.span;
  for (int64_t t = 0; t < p.n; ++t) {
    const float* xt = p.x + t * p.cols;
    int8_t* out = p.xq.data() + t * p.cols;
    for (int64_t b = 0; b < p.nb; ++b) {
      float amax = 0.0f;
      for (int c = 0; c < kBlock; ++c) amax = std::max(amax, std::fabs(xt[b * kBlock + c]));
      const float dd = amax / 127.0f, id = dd > 0.0f ? 1.0f / dd : 0.0f;
      int32_t sum = 0;
      for (int c = 0; c < kBlock; ++c) {
        const float v = std::nearbyint(xt[b * kBlock + c] * id);
        q[size_t(c)] = int8_t(std::min(127.0f, std::max(-127.0f, v)));
        sum += q[size_t(c)];
      }
      p.d[size_t(t * p.nb + b)] = dd;
      p.bsum[size_t(t * p.nb + b)] = sum;
      if (p.w.bits == 8) {
        std::memcpy(out + b * kBlock, q.data(), kBlock);
      } else {  // column c0 + 2j -> even half, byte (b % span) * 16 + j; c0 + 2j + 1 -> odd half
        const int64_t base = (b / p.span) * sb_cols, at = (b % p.span) * 16;
        for (int j = 0; j < 16; ++j) {
          out[base + at + j] = q[size_t(2 * j)];
          out[base + p.span * 16 + at + j] = q[size_t(2 * j + 1)];
        }
      }
    }
    const int64_t per_group = int64_t(p.w.group) / kBlock;
    for (int64_t g = 0; g < p.ng; ++g) {
      float s = 0.0f;
      for (int64_t b = g * per_group; b < (g + 1) * per_group; ++b)
        s += p.d[size_t(t * p.nb + b)] * float(p.bsum[size_t(t * p.nb + b)]);
      p.xz[size_t(t * p.ngp + g)] = s;
    }
  }
  if (p.kernels) {
    p.xl.assign(size_t(p.n * p.lanes), 0.0f);
    for (int64_t t = 0; t < p.n; ++t)
      for (int64_t l = 0; l < p.lanes; ++l) p.xl[size_t(t * p.lanes + l)] = p.d[size_t(t * p.nb + l / p.lpb)];
  }
}

}  // namespace

std::vector<std::string> qdot_isas() {
  static const std::vector<std::string> isas = [] {
    std::vector<std::string> out;
#if defined(__x86_64__)
    if (has_avx512vnni()) out.push_back("avx512vnni");
    if (has_avx512bw()) out.push_back("avx512");
    if (has_avxvnni()) out.push_back("avxvnni");
    if (has_avx2()) out.push_back("avx2");
#endif
    out.push_back("scalar");
    return out;
  }();
  return isas;
}

std::unique_ptr<QLinearJob> make_qdot_job(const float* x, int64_t n, const QMatrixView& w, float* y,
                                          const std::string& isa) {
  MOE_CHECK(w.bits == 4 || w.bits == 8, "qdot: bits must be 4 or 8, got " << w.bits);
  auto p = std::make_unique<QDot>();
  const std::string path = fit_isa(isa, w.cols, w.bits);
  p->w = w, p->x = x, p->n = n, p->cols = w.cols, p->y = y;
  p->nb = w.cols / kBlock, p->ng = w.cols / w.group, p->ngp = int64_t(round_up(size_t(p->ng), 16));
  p->gshift = __builtin_ctz(unsigned(w.group));
  p->row_bytes = w.cols * w.bits / 8;
  p->lpb = w.bits == 8 ? 8 : 4;
  p->lanes = p->nb * p->lpb;
  p->stride = p->ngp + 16;
  for (int l = 0; l < 16; ++l) p->lane_group[l] = ((l / p->lpb) * kBlock) >> p->gshift;
#if defined(__x86_64__)
  if (path == "avx512vnni") p->kernels = w.bits == 8 ? &kernels512<8, true> : &kernels512<4, true>;
  if (path == "avx512") p->kernels = w.bits == 8 ? &kernels512<8, false> : &kernels512<4, false>;
  if (path == "avxvnni") p->kernels = w.bits == 8 ? &kernels256<8, true> : &kernels256<4, true>;
  if (path == "avx2") p->kernels = w.bits == 8 ? &kernels256<8, false> : &kernels256<4, false>;
#endif
  p->span = path == "scalar" ? 1 : path == "avx2" || path == "avxvnni" ? 2 : 4;
  p->shifted = w.bits == 8 && (path == "avx512" || path == "avx2");
  quantize_acts(*p);
  p->num_rows = w.rows;
  const int wide = p->kernels ? p->kernels->wide : 1;
  p->scratch_floats = 2 * wide * p->stride;
  p->work = w.rows * w.cols * (n + 1) / 2;
  return p;
}

}  // namespace moe
