// bf16 GEMV / small GEMM on the CPU; see bf16_gemv.h for the math and the paths.
//
//   bf16_linear: check arguments -> pick the path -> x as the path wants it (float32 copy, even/odd
//   deinterleaved blocks) -> split rows over the pool -> per row and block of <= 4 tokens: one kernel call
//   with 4 x NT accumulators in registers -> fixed-order sum + tail columns (scalar) + bias -> y.
//
// Per row and token the order of operations is fixed by the path alone (neither the thread count, the
// chunking nor the other tokens of the call change it), so results do not depend on the thread count, and
// a token's result does not depend on the batch it came in. Each thread reads its rows as one sequential
// stream and prefetches every cache line of it 8 KiB ahead into L2 (prefetcht1). Measured on an Intel Xeon VM
// (AMX/avx512bf16, 2 cores), one 7168 x 1024 bf16 matrix after another from DRAM: 4 KiB-8 KiB ahead into L2, or
// no software prefetch at all, 11-12 GB/s per thread (21 at 2 threads, the bound torch.sum reads at); the
// former 2 KiB non-temporal prefetch (prefetchnta, which had helped on an AMD EPYC VM by keeping weights out
// of L2/L3) 5.8 GB/s. Decode of the bench checkpoint went from ~0.55x llama.cpp to 1.28x (bench/RESULTS.md).
#include "bf16_gemv.h"

#include <algorithm>
#include <array>
#include <atomic>
#include <cstring>

#include "bf16.h"
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

constexpr int kTokenBlock = 4;                   // tokens whose accumulators stay in registers
constexpr int kUnroll = 4;                       // accumulators per token (SIMD blocks in flight)
constexpr int kRowStep = 4;                      // granularity of thread chunks (rows)
constexpr int64_t kPrefetch = 4096;              // weights (bf16) ahead of the current block to prefetch (8 KiB)
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

// Prefetch into L2 of `lines` consecutive cache lines (32 bf16 each) starting at p.
template <int lines>
inline void prefetch_l2(const uint16_t* p) {
#pragma GCC unroll 4
  for (int i = 0; i < lines; ++i) __builtin_prefetch(p + 32 * i, 0, 2);
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

// Row r for tokens [t0, t0 + NT).
using RowFn = void (*)(const Ctx&, int64_t r, int64_t t0);

// The kernels of one SIMD path: row[NT - 1] for NT tokens; block: columns per SIMD step (the deinterleaving
// block, 2L).
struct Kernels {
  std::array<RowFn, kTokenBlock> row;
  int block;
};

// ------------------------------------------------------------------------------------ scalar twin

void rows_scalar(const Ctx& c, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t t = 0; t < c.n; ++t) store(c, r, t, tail_dot(c, r, t, 0));
}

#if defined(__x86_64__)
// Each kernel computes one row for NT tokens with kUnroll accumulators per token over consecutive SIMD
// blocks of columns (independent FMA chains; a thread reads its rows as one sequential stream, which the
// hardware prefetchers follow best), then sums them in a fixed order. Leftover whole blocks go to
// accumulator 0, leftover columns to the scalar tail.

// ------------------------------------------------------------------------------------ AVX-512F
// A 512-bit load holds 32 bf16 = 16 pairs: (pair << 16) is the even column as float32, (pair & 0xffff0000)
// the odd one; they meet x's even and odd columns of the block.

MOE_AVX512 inline void fma_block512(const uint16_t* w, const float* x, __m512& acc) {
  const __m512i v = _mm512_loadu_si512(w);
  const __m512 we = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  const __m512 wo = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xffff0000u))));
  acc = _mm512_fmadd_ps(wo, _mm512_loadu_ps(x + 16), _mm512_fmadd_ps(we, _mm512_loadu_ps(x), acc));
}

template <int NT>
MOE_AVX512 void row_avx512(const Ctx& c, int64_t r, int64_t t0) {
  const uint16_t* w = c.w + r * c.cols;
  const float* x = c.xd + t0 * c.main;
  __m512 acc[kUnroll][NT];
#pragma GCC unroll 16
  for (int q = 0; q < kUnroll * NT; ++q) acc[q / NT][q % NT] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 32 * kUnroll <= c.main; b += 32 * kUnroll) {
    prefetch_l2<4>(w + b + kPrefetch);
#pragma GCC unroll 4
    for (int u = 0; u < kUnroll; ++u)
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) fma_block512(w + b + 32 * u, x + t * c.main + b + 32 * u, acc[u][t]);
  }
  for (; b < c.main; b += 32)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) fma_block512(w + b, x + t * c.main + b, acc[0][t]);
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]), _mm512_add_ps(acc[2][t], acc[3][t]));
    store(c, r, t0 + t, _mm512_reduce_add_ps(sum) + tail_dot(c, r, t0 + t, c.main));
  }
}

// ------------------------------------------------------------------------------------ AVX512_BF16
// vdpbf16ps: acc[j] += w[2j] * x[2j] + w[2j+1] * x[2j+1] on bf16 pairs straight from memory.

template <int NT>
MOE_AVX512BF16 inline void dp_block(const uint16_t* w, const uint16_t* x, int64_t cols, __m512* acc) {
  const __m512bh wv = (__m512bh)_mm512_loadu_si512(w);
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) acc[t] = _mm512_dpbf16_ps(acc[t], wv, (__m512bh)_mm512_loadu_si512(x + t * cols));
}

template <int NT>
MOE_AVX512BF16 void row_avx512bf16(const Ctx& c, int64_t r, int64_t t0) {
  const uint16_t* w = c.w + r * c.cols;
  const uint16_t* x = c.xb + t0 * c.cols;
  __m512 acc[kUnroll][NT];
#pragma GCC unroll 16
  for (int q = 0; q < kUnroll * NT; ++q) acc[q / NT][q % NT] = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 32 * kUnroll <= c.main; b += 32 * kUnroll) {
    prefetch_l2<4>(w + b + kPrefetch);
#pragma GCC unroll 4
    for (int u = 0; u < kUnroll; ++u) dp_block<NT>(w + b + 32 * u, x + b + 32 * u, c.cols, acc[u]);
  }
  for (; b < c.main; b += 32) dp_block<NT>(w + b, x + b, c.cols, acc[0]);
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    const __m512 sum = _mm512_add_ps(_mm512_add_ps(acc[0][t], acc[1][t]), _mm512_add_ps(acc[2][t], acc[3][t]));
    store(c, r, t0 + t, _mm512_reduce_add_ps(sum) + tail_dot(c, r, t0 + t, c.main));
  }
}

// ------------------------------------------------------------------------------------ AVX2 + FMA

MOE_AVX2 inline float hsum_avx2(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

MOE_AVX2 inline void fma_block256(const uint16_t* w, const float* x, __m256& acc) {
  const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w));
  const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(int(0xffff0000u))));
  acc = _mm256_fmadd_ps(wo, _mm256_loadu_ps(x + 8), _mm256_fmadd_ps(we, _mm256_loadu_ps(x), acc));
}

template <int NT>
MOE_AVX2 void row_avx2(const Ctx& c, int64_t r, int64_t t0) {
  const uint16_t* w = c.w + r * c.cols;
  const float* x = c.xd + t0 * c.main;
  __m256 acc[kUnroll][NT];
#pragma GCC unroll 16
  for (int q = 0; q < kUnroll * NT; ++q) acc[q / NT][q % NT] = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 16 * kUnroll <= c.main; b += 16 * kUnroll) {
    prefetch_l2<2>(w + b + kPrefetch);
#pragma GCC unroll 4
    for (int u = 0; u < kUnroll; ++u)
#pragma GCC unroll 4
      for (int t = 0; t < NT; ++t) fma_block256(w + b + 16 * u, x + t * c.main + b + 16 * u, acc[u][t]);
  }
  for (; b < c.main; b += 16)
#pragma GCC unroll 4
    for (int t = 0; t < NT; ++t) fma_block256(w + b, x + t * c.main + b, acc[0][t]);
#pragma GCC unroll 4
  for (int t = 0; t < NT; ++t) {
    const __m256 sum = _mm256_add_ps(_mm256_add_ps(acc[0][t], acc[1][t]), _mm256_add_ps(acc[2][t], acc[3][t]));
    store(c, r, t0 + t, hsum_avx2(sum) + tail_dot(c, r, t0 + t, c.main));
  }
}

// ------------------------------------------------------------------------------------ dispatch

const Kernels kAvx512{{row_avx512<1>, row_avx512<2>, row_avx512<3>, row_avx512<4>}, 32};
const Kernels kAvx512Bf16{{row_avx512bf16<1>, row_avx512bf16<2>, row_avx512bf16<3>, row_avx512bf16<4>}, 32};
const Kernels kAvx2{{row_avx2<1>, row_avx2<2>, row_avx2<3>, row_avx2<4>}, 16};

void rows_simd(const Ctx& c, int64_t r0, int64_t r1, const Kernels& k) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t t0 = 0; t0 < c.n; t0 += kTokenBlock) k.row[std::min<int64_t>(kTokenBlock, c.n - t0) - 1](c, r, t0);
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
        rows_simd(c, r0, r1, *k);
        continue;
      }
#endif
      rows_scalar(c, r0, r1);
    }
  });
}

}  // namespace moe
