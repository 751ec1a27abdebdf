// bf16 GEMV / small GEMM on the CPU; see bf16_gemv.h for the math and the paths.
//
//   bf16_linear: check arguments -> pick the path -> x as the path wants it (float32 copy, even/odd
//   deinterleaved blocks) -> split rows over the pool -> per block of 4 rows and <= 8 tokens: one kernel
//   call with RB x NT accumulators in registers -> horizontal sum + tail columns (scalar) + bias -> y.
//
// Per row and token the order of operations is fixed by the path alone (a row computed in a block of 4 or
// alone does the same operations), so neither the thread count nor the chunking changes any result.
// The next block of rows is prefetched into L1 while the current one is read (one line per row per step).
#include "bf16_gemv.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>

#include "common.h"
#include "thread_pool.h"

#if defined(__x86_64__)
#include <immintrin.h>
#define MOE_AVX2 __attribute__((target("avx2,fma")))
#define MOE_AVX512 __attribute__((target("avx512f,avx2,fma")))
#define MOE_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512bf16,avx2,fma")))
#endif

namespace moe {
namespace {

constexpr int kTokenBlock = 8;                   // tokens whose accumulators stay in registers
constexpr int kRowStep = 4;                      // rows per block (and the granularity of thread chunks)
constexpr int64_t kMinBytesPerThread = 96 << 10; // weights worth a second thread (~5 us at 20 GB/s)

struct Ctx {
  const float* xf;     // [n, cols] x as float32 (the caller's, or a converted copy)
  const uint16_t* xb;  // [n, cols] x as bf16 (bf16 input only)
  const float* xd;     // [n, main] x deinterleaved per block of 2L columns: L even columns, then L odd
  int64_t n, rows, cols;
  int64_t main;        // columns the SIMD blocks cover (a multiple of 2L); the rest is the scalar tail
  const uint16_t* w;
  const uint16_t* bias;
  void* y;
  bool y_f32;
};

inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Round to nearest even, NaN kept quiet (as c10::BFloat16).
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// sum_{k in [from, cols)} w[r, k] * x[t, k], in column order.
inline float tail_dot(const Ctx& c, int64_t r, int64_t t, int64_t from) {
  const uint16_t* w = c.w + r * c.cols;
  const float* x = c.xf + t * c.cols;
  float s = 0.0f;
  for (int64_t k = from; k < c.cols; ++k) s += bf16_to_float(w[k]) * x[k];
  return s;
}

inline void store(const Ctx& c, int64_t r, int64_t t, float acc) {
  if (c.bias) acc += bf16_to_float(c.bias[r]);
  if (c.y_f32) {
    static_cast<float*>(c.y)[t * c.rows + r] = acc;
  } else {
    static_cast<uint16_t*>(c.y)[t * c.rows + r] = float_to_bf16(acc);
  }
}

// Rows [r, r + RB) for tokens [t0, t0 + NT).
using BlockFn = void (*)(const Ctx&, int64_t r, int64_t t0);

// The kernels of one SIMD path: wide[NT - 1] computes rb[NT - 1] rows (a divisor of kRowStep), single[NT - 1]
// one row; block: columns per SIMD step (the deinterleaving block, 2L).
struct Kernels {
  std::array<BlockFn, kTokenBlock> wide, single;
  std::array<int, kTokenBlock> rb;
  int block;
};

// ------------------------------------------------------------------------------------ scalar twin

void rows_scalar(const Ctx& c, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t t = 0; t < c.n; ++t) store(c, r, t, tail_dot(c, r, t, 0));
}

#if defined(__x86_64__)
// ------------------------------------------------------------------------------------ AVX-512F
// A 512-bit load holds 32 bf16 = 16 pairs: (pair << 16) is the even column as float32, (pair & 0xffff0000)
// the odd one; they meet x's even and odd columns of the block.

template <int NT, int RB>
MOE_AVX512 void block_avx512(const Ctx& c, int64_t r, int64_t t0) {
  const uint16_t* w[RB];
  for (int i = 0; i < RB; ++i) w[i] = c.w + (r + i) * c.cols;
  const int64_t ahead = RB * c.cols;
  const __m512i odd = _mm512_set1_epi32(int(0xffff0000u));
  __m512 acc[RB][NT];
#pragma GCC unroll 32
  for (int q = 0; q < RB * NT; ++q) acc[q / NT][q % NT] = _mm512_setzero_ps();
  for (int64_t b = 0; b < c.main; b += 32) {
    __m512 we[RB], wo[RB];
#pragma GCC unroll 4
    for (int i = 0; i < RB; ++i) {
      const __m512i v = _mm512_loadu_si512(w[i] + b);
      __builtin_prefetch(w[i] + ahead + b, 0, 3);
      we[i] = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
      wo[i] = _mm512_castsi512_ps(_mm512_and_si512(v, odd));
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const float* x = c.xd + (t0 + t) * c.main + b;
      const __m512 xe = _mm512_loadu_ps(x), xo = _mm512_loadu_ps(x + 16);
#pragma GCC unroll 4
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm512_fmadd_ps(wo[i], xo, _mm512_fmadd_ps(we[i], xe, acc[i][t]));
    }
  }
#pragma GCC unroll 32
  for (int q = 0; q < RB * NT; ++q) {
    const int i = q / NT, t = q % NT;
    store(c, r + i, t0 + t, _mm512_reduce_add_ps(acc[i][t]) + tail_dot(c, r + i, t0 + t, c.main));
  }
}

// ------------------------------------------------------------------------------------ AVX512_BF16
// vdpbf16ps: acc[j] += w[2j] * x[2j] + w[2j+1] * x[2j+1] on bf16 pairs straight from memory.

template <int NT, int RB>
MOE_AVX512BF16 void block_avx512bf16(const Ctx& c, int64_t r, int64_t t0) {
  const uint16_t* w[RB];
  for (int i = 0; i < RB; ++i) w[i] = c.w + (r + i) * c.cols;
  const int64_t ahead = RB * c.cols;
  __m512 acc[RB][NT];
#pragma GCC unroll 32
  for (int q = 0; q < RB * NT; ++q) acc[q / NT][q % NT] = _mm512_setzero_ps();
  for (int64_t b = 0; b < c.main; b += 32) {
    __m512bh wv[RB];
#pragma GCC unroll 4
    for (int i = 0; i < RB; ++i) {
      wv[i] = (__m512bh)_mm512_loadu_si512(w[i] + b);
      __builtin_prefetch(w[i] + ahead + b, 0, 3);
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(c.xb + (t0 + t) * c.cols + b);
#pragma GCC unroll 4
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm512_dpbf16_ps(acc[i][t], wv[i], xv);
    }
  }
#pragma GCC unroll 32
  for (int q = 0; q < RB * NT; ++q) {
    const int i = q / NT, t = q % NT;
    store(c, r + i, t0 + t, _mm512_reduce_add_ps(acc[i][t]) + tail_dot(c, r + i, t0 + t, c.main));
  }
}

// ------------------------------------------------------------------------------------ AVX2 + FMA

MOE_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

template <int NT, int RB>
MOE_AVX2 void block_avx2(const Ctx& c, int64_t r, int64_t t0) {
  const uint16_t* w[RB];
  for (int i = 0; i < RB; ++i) w[i] = c.w + (r + i) * c.cols;
  const int64_t ahead = RB * c.cols;
  const __m256i odd = _mm256_set1_epi32(int(0xffff0000u));
  __m256 acc[RB][NT];
#pragma GCC unroll 32
  for (int q = 0; q < RB * NT; ++q) acc[q / NT][q % NT] = _mm256_setzero_ps();
  for (int64_t b = 0; b < c.main; b += 16) {
    __m256 we[RB], wo[RB];
#pragma GCC unroll 4
    for (int i = 0; i < RB; ++i) {
      const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + b));
      if (b % 32 == 0) __builtin_prefetch(w[i] + ahead + b, 0, 3);
      we[i] = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
      wo[i] = _mm256_castsi256_ps(_mm256_and_si256(v, odd));
    }
#pragma GCC unroll 8
    for (int t = 0; t < NT; ++t) {
      const float* x = c.xd + (t0 + t) * c.main + b;
      const __m256 xe = _mm256_loadu_ps(x), xo = _mm256_loadu_ps(x + 8);
#pragma GCC unroll 4
      for (int i = 0; i < RB; ++i) acc[i][t] = _mm256_fmadd_ps(wo[i], xo, _mm256_fmadd_ps(we[i], xe, acc[i][t]));
    }
  }
#pragma GCC unroll 32
  for (int q = 0; q < RB * NT; ++q) {
    const int i = q / NT, t = q % NT;
    store(c, r + i, t0 + t, hsum_avx2(acc[i][t]) + tail_dot(c, r + i, t0 + t, c.main));
  }
}

// ------------------------------------------------------------------------------------ blocking

// Rows per call by tokens per call: 32 zmm registers hold RB * NT accumulators plus 2 * RB weights; 16 ymm fewer.
constexpr int rb512(int nt) { return nt <= 4 ? 4 : 2; }
constexpr int rb256(int nt) { return nt == 1 ? 4 : nt <= 4 ? 2 : 1; }

#define MOE_GEMV_TABLE(K, RB) \
  {K<1, RB(1)>, K<2, RB(2)>, K<3, RB(3)>, K<4, RB(4)>, K<5, RB(5)>, K<6, RB(6)>, K<7, RB(7)>, K<8, RB(8)>}
#define MOE_ONE(nt) 1
#define MOE_GEMV_RBS(RB) {RB(1), RB(2), RB(3), RB(4), RB(5), RB(6), RB(7), RB(8)}

const Kernels kAvx512{MOE_GEMV_TABLE(block_avx512, rb512), MOE_GEMV_TABLE(block_avx512, MOE_ONE),
                      MOE_GEMV_RBS(rb512), 32};
const Kernels kAvx512Bf16{MOE_GEMV_TABLE(block_avx512bf16, rb512), MOE_GEMV_TABLE(block_avx512bf16, MOE_ONE),
                          MOE_GEMV_RBS(rb512), 32};
const Kernels kAvx2{MOE_GEMV_TABLE(block_avx2, rb256), MOE_GEMV_TABLE(block_avx2, MOE_ONE), MOE_GEMV_RBS(rb256), 16};

void rows_blocked(const Ctx& c, int64_t r0, int64_t r1, const Kernels& k) {
  int64_t r = r0;
  for (; r + kRowStep <= r1; r += kRowStep) {
    for (int64_t t0 = 0; t0 < c.n; t0 += kTokenBlock) {
      const int nt = int(std::min<int64_t>(kTokenBlock, c.n - t0));
      for (int i = 0; i < kRowStep; i += k.rb[nt - 1]) k.wide[nt - 1](c, r + i, t0);
    }
  }
  for (; r < r1; ++r)
    for (int64_t t0 = 0; t0 < c.n; t0 += kTokenBlock) k.single[std::min<int64_t>(kTokenBlock, c.n - t0) - 1](c, r, t0);
}

bool cpu_has(const char* feature) {
  __builtin_cpu_init();
  if (std::strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (std::strcmp(feature, "avx512") == 0) return cpu_has("avx2") && __builtin_cpu_supports("avx512f");
  return cpu_has("avx512") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
         __builtin_cpu_supports("avx512bf16");
}
#endif  // __x86_64__

const Kernels* kernels_for(const std::string& path) {
#if defined(__x86_64__)
  if (path == "avx512bf16") return &kAvx512Bf16;
  if (path == "avx512") return &kAvx512;
  if (path == "avx2") return &kAvx2;
#endif
  return nullptr;
}

// The path to run: `isa` checked against this CPU; float32 x never takes avx512bf16 (it would round x).
std::string pick_path(const std::string& isa, bool x_f32) {
  const std::vector<std::string> ok = bf16_linear_isas();
  std::string path = isa == "auto" ? ok.front() : isa;
  if (std::find(ok.begin(), ok.end(), path) == ok.end()) {
    std::ostringstream names;
    for (const auto& n : ok) names << " '" << n << "'";
    MOE_CHECK(false, "bf16_linear: isa '" << isa << "' is not available on this CPU; use 'auto' or one of"
                                          << names.str());
  }
  return path == "avx512bf16" && x_f32 ? "avx512" : path;
}

void check_args(const Bf16LinearArgs& a, int num_threads) {
  MOE_CHECK(a.rows >= 0 && a.cols >= 1 && a.n >= 0,
            "bf16_linear: need rows >= 0, cols >= 1, n >= 0; got rows=" << a.rows << " cols=" << a.cols
                                                                        << " n=" << a.n);
  MOE_CHECK(num_threads >= 1 && num_threads <= 1024,
            "bf16_linear: num_threads must be in 1..1024, got " << num_threads);
  if (a.n == 0 || a.rows == 0) return;
  MOE_CHECK(a.x && a.w && a.y, "bf16_linear: x, w and y must be non-null pointers");
}

}  // namespace

std::vector<std::string> bf16_linear_isas() {
  static const std::vector<std::string> isas = [] {  // cpuid traps to the hypervisor in a VM: ask once
    std::vector<std::string> out;
#if defined(__x86_64__)
    if (cpu_has("avx512bf16")) out.push_back("avx512bf16");
    if (cpu_has("avx512")) out.push_back("avx512");
    if (cpu_has("avx2")) out.push_back("avx2");
#endif
    out.push_back("scalar");
    return out;
  }();
  return isas;
}

void bf16_linear(const Bf16LinearArgs& a, int num_threads, const std::string& isa) {
  check_args(a, num_threads);
  const std::string path = pick_path(isa, a.x_f32);
  if (a.n == 0 || a.rows == 0) return;
  const Kernels* k = kernels_for(path);
  const int block = k ? k->block : 1;
  const int64_t main = k ? a.cols / block * block : 0;

  std::vector<float> xf;   // x as float32 when it is bf16 (the tails and the scalar path read it)
  if (!a.x_f32) {
    const auto* xb = static_cast<const uint16_t*>(a.x);
    xf.resize(a.n * a.cols);
    for (int64_t i = 0; i < a.n * a.cols; ++i) xf[i] = bf16_to_float(xb[i]);
  }
  const float* x = a.x_f32 ? static_cast<const float*>(a.x) : xf.data();
  std::vector<float> xd;   // even/odd deinterleaved blocks for the shift-and-FMA paths
  if (k && path != "avx512bf16") {
    const int half = block / 2;
    xd.resize(a.n * main);
    for (int64_t t = 0; t < a.n; ++t)
      for (int64_t b = 0; b < main; b += block)
        for (int j = 0; j < half; ++j) {
          xd[t * main + b + j] = x[t * a.cols + b + 2 * j];
          xd[t * main + b + half + j] = x[t * a.cols + b + 2 * j + 1];
        }
  }
  const Ctx c{x, a.x_f32 ? nullptr : static_cast<const uint16_t*>(a.x), xd.data(), a.n, a.rows, a.cols, main,
              a.w, a.bias, a.y, a.x_f32};

  const int64_t bytes = a.rows * a.cols * 2 * ((a.n + kTokenBlock - 1) / kTokenBlock);
  const int64_t threads = std::clamp<int64_t>(std::min(bytes / kMinBytesPerThread, a.rows / kRowStep), 1, num_threads);
  // Threads take chunks of whole row blocks from a shared counter, about 8 per thread: a thread that shares
  // its core with another process then does less.
  const int64_t chunk = round_up(size_t(std::max<int64_t>(1, a.rows / (threads * 8))), kRowStep);
  std::atomic<int64_t> next{0};
  pool().run(int(threads), [&](int) {
    for (int64_t r0 = next.fetch_add(chunk); r0 < a.rows; r0 = next.fetch_add(chunk)) {
      const int64_t r1 = std::min(a.rows, r0 + chunk);
#if defined(__x86_64__)
      if (k) {
        rows_blocked(c, r0, r1, *k);
        continue;
      }
#endif
      rows_scalar(c, r0, r1);
    }
  });
}

}  // namespace moe
