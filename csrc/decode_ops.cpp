// Fused bf16 decode-step ops on the CPU; see decode_ops.h for the math.
//
// Inner loops are written so the compiler vectorizes them without reassociating float sums (16 independent
// lanes, summed in a fixed order at the end), and are compiled for AVX-512, AVX2 and baseline x86-64 with the
// best picked at load (target_clones). The experts' matmuls are bf16_gemv.cpp's kernel.
#include "decode_ops.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <memory>

#include "bf16.h"
#include "bf16_gemv.h"
#include "common.h"
#include "thread_pool.h"

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MOE_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MOE_CLONES
#endif

namespace moe {
namespace {

constexpr int kLanes = 16;                    // independent float accumulators of a reduction
constexpr int64_t kMinAttendWork = 1 << 16;   // multiply-adds worth a second thread in attention

// Short names: the loops below convert on almost every term.
inline float bf(uint16_t h) { return bf16_to_float(h); }
inline uint16_t to_bf(float f) { return float_to_bf16(f); }

// exp(x) within ~2 ulp for float32 (Cody-Waite reduction by ln 2, degree-6 polynomial), vectorizable: no calls,
// no branches. Inputs are clamped to [-87.3, 88.7] (results stay normal and finite).
inline float exp_approx(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float magic = 12582912.0f;                        // 1.5 * 2^23: adding it rounds to an integer
  const float n = (x * 1.44269504088896341f + magic) - magic;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float y = p * r * r + r + 1.0f;
  const int32_t bits = (int32_t(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return y * scale;
}

MOE_CLONES float sum_squares(const uint16_t* x, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += bf(x[i + j]) * bf(x[i + j]);
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += bf(x[i]) * bf(x[i]);
  return s;
}

MOE_CLONES void add_rows(const uint16_t* a, const uint16_t* b, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = to_bf(bf(a[i]) + bf(b[i]));
}

MOE_CLONES void scale_row(const uint16_t* x, const uint16_t* w, float inv, int64_t n, uint16_t* y) {
  for (int64_t i = 0; i < n; ++i) y[i] = to_bf(bf(w[i]) * bf(to_bf(bf(x[i]) * inv)));
}

MOE_CLONES float dot_f32_bf16(const float* q, const uint16_t* k, int64_t n) {
  float acc[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) acc[j] += q[i + j] * bf(k[i + j]);
  float s = 0.0f;
  for (int j = 0; j < kLanes; ++j) s += acc[j];
  for (; i < n; ++i) s += q[i] * bf(k[i]);
  return s;
}

MOE_CLONES void axpy_bf16(float a, const uint16_t* v, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] += a * bf(v[i]);
}

// h = bf16(bf16(silu(g)) * u) for gate g and up u (bf16), silu(g) = g / (1 + exp(-g)) in float32.
MOE_CLONES void silu_mul(const uint16_t* g, const uint16_t* u, int64_t n, uint16_t* h) {
  for (int64_t i = 0; i < n; ++i) {
    const float x = bf(g[i]);
    h[i] = to_bf(bf(to_bf(x / (1.0f + exp_approx(-x)))) * bf(u[i]));
  }
}

// One rotate-half rotation of a head's first `rot` dims (the rest copied), rounding as torch's bf16 ops do:
// bf16(bf16(x * cos) + bf16(rotate_half(x) * sin)).
void rotate_head(const uint16_t* x, const uint16_t* cos, const uint16_t* sin, int64_t dh, int64_t rot,
                 uint16_t* y) {
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < rot; ++i) {
    const float other = i < half ? -bf(x[i + half]) : bf(x[i - half]);
    y[i] = to_bf(bf(to_bf(bf(x[i]) * bf(cos[i]))) + bf(to_bf(other * bf(sin[i]))));
  }
  std::memcpy(y + rot, x + rot, size_t(dh - rot) * 2);
}

// Attention of query head `qh` of row `row` (see AttendArgs); scores/out are scratch of s and dh floats.
void attend_head(const AttendArgs& a, int64_t row, int64_t qh, float* scores, float* qf, float* acc) {
  const AttendRow& r = a.rows[size_t(row)];
  const int64_t g = qh / (a.h / a.hkv);
  const uint16_t* q = a.q + (row * a.h + qh) * a.dh;
  for (int64_t i = 0; i < a.dh; ++i) qf[i] = bf(q[i]);
  const uint16_t* k = r.k + g * r.k_sh;
  float m = a.sinks ? a.sinks[qh] : -INFINITY;
  for (int64_t s = 0; s < r.s; ++s) {
    scores[s] = r.mask[s] ? dot_f32_bf16(qf, k + s * a.k_ss, a.dh) * a.scale : -INFINITY;
    m = std::max(m, scores[s]);
  }
  float total = a.sinks ? std::exp(a.sinks[qh] - m) : 0.0f;
  std::fill(acc, acc + a.dh, 0.0f);
  const uint16_t* v = r.v + g * r.v_sh;
  for (int64_t s = 0; s < r.s; ++s) {
    if (!r.mask[s]) continue;
    const float p = std::exp(scores[s] - m);
    total += p;
    axpy_bf16(p, v + s * a.v_ss, a.dh, acc);
  }
  uint16_t* out = a.out + (row * a.h + qh) * a.dh;
  for (int64_t i = 0; i < a.dh; ++i) out[i] = to_bf(acc[i] / total);
}

// y [c, rows] = x [c, cols] @ w^T with bf16_gemv's kernel.
void gemv(const uint16_t* x, int64_t c, const uint16_t* w, int64_t rows, int64_t cols, uint16_t* y, int threads) {
  Bf16LinearArgs a;
  a.x = x, a.x_f32 = false, a.n = c, a.w = w, a.rows = rows, a.cols = cols, a.y = y;
  bf16_linear(a, threads);
}

}  // namespace

void rms_norm_bf16(const uint16_t* x, const uint16_t* delta, const uint16_t* w, int64_t n, int64_t d, float eps,
                   uint16_t* sum, uint16_t* y) {
  MOE_CHECK(n >= 0 && d >= 1, "rms_norm_bf16: need n >= 0 and d >= 1, got n=" << n << " d=" << d);
  MOE_CHECK(!delta || sum, "rms_norm_bf16: a residual delta needs an output for the sum");
  if (delta) {
    add_rows(x, delta, n * d, sum);
    x = sum;
  }
  for (int64_t r = 0; r < n; ++r) {
    const float inv = 1.0f / std::sqrt(sum_squares(x + r * d, d) / float(d) + eps);
    scale_row(x + r * d, w, inv, d, y + r * d);
  }
}

void route_softmax_topk(const uint16_t* logits, int64_t n, int64_t e, int64_t k, bool normalize, float* weights,
                        int64_t* ids) {
  MOE_CHECK(n >= 0 && e >= 1 && k >= 1 && k <= e,
            "route_softmax_topk: need 1 <= k <= e, got n=" << n << " e=" << e << " k=" << k);
  std::vector<float> p(static_cast<size_t>(e));
  std::vector<int64_t> order(static_cast<size_t>(e));
  for (int64_t t = 0; t < n; ++t) {
    const uint16_t* row = logits + t * e;
    float m = -INFINITY;
    for (int64_t i = 0; i < e; ++i) m = std::max(m, bf(row[i]));
    float total = 0.0f;
    for (int64_t i = 0; i < e; ++i) total += p[i] = std::exp(bf(row[i]) - m);
    for (int64_t i = 0; i < e; ++i) p[i] /= total;
    for (int64_t i = 0; i < e; ++i) order[i] = i;
    std::partial_sort(order.begin(), order.begin() + k, order.end(),
                      [&](int64_t a, int64_t b) { return p[a] > p[b] || (p[a] == p[b] && a < b); });
    float chosen = 0.0f;
    for (int64_t j = 0; j < k; ++j) chosen += p[order[j]];
    for (int64_t j = 0; j < k; ++j) {
      ids[t * k + j] = order[j];
      weights[t * k + j] = normalize ? p[order[j]] / chosen : p[order[j]];
    }
  }
}

void rope_qkv_bf16(const uint16_t* qkv, const uint16_t* cos, const uint16_t* sin, int64_t b, int64_t h,
                   int64_t hkv, int64_t dh, int64_t rot, uint16_t* q, uint16_t* k, int64_t k_sb, int64_t k_sh,
                   uint16_t* v, int64_t v_sb, int64_t v_sh) {
  MOE_CHECK(b >= 0 && h >= 1 && hkv >= 1 && dh >= 1 && rot >= 2 && rot % 2 == 0 && rot <= dh,
            "rope_qkv_bf16: need b >= 0, h, hkv, dh >= 1 and an even rot in [2, dh]; got b="
                << b << " h=" << h << " hkv=" << hkv << " dh=" << dh << " rot=" << rot);
  const int64_t width = (h + 2 * hkv) * dh;
  for (int64_t r = 0; r < b; ++r) {
    const uint16_t* row = qkv + r * width;
    for (int64_t i = 0; i < h; ++i) rotate_head(row + i * dh, cos + r * rot, sin + r * rot, dh, rot, q + (r * h + i) * dh);
    for (int64_t i = 0; i < hkv; ++i) {
      rotate_head(row + (h + i) * dh, cos + r * rot, sin + r * rot, dh, rot, k + r * k_sb + i * k_sh);
      std::memcpy(v + r * v_sb + i * v_sh, row + (h + hkv + i) * dh, size_t(dh) * 2);
    }
  }
}

void attend_decode_bf16(const AttendArgs& a, int num_threads) {
  MOE_CHECK(a.h >= 1 && a.hkv >= 1 && a.h % a.hkv == 0 && a.dh >= 1,
            "attend_decode_bf16: need h a multiple of hkv and dh >= 1; got h=" << a.h << " hkv=" << a.hkv
                                                                             << " dh=" << a.dh);
  MOE_CHECK(num_threads >= 1, "attend_decode_bf16: num_threads must be >= 1, got " << num_threads);
  const int64_t b = int64_t(a.rows.size());
  int64_t keys = 0, longest = 0;
  for (int64_t i = 0; i < b; ++i) {
    const AttendRow& r = a.rows[size_t(i)];
    MOE_CHECK(r.s >= 1 && r.k && r.v && r.mask, "attend_decode_bf16: row " << i << " has s=" << r.s
                                                                            << " keys or a null pointer");
    keys += r.s, longest = std::max(longest, r.s);
  }
  if (b == 0) return;
  const int64_t heads = b * a.h;
  const int64_t work = keys * a.h * a.dh;
  const int threads = int(std::clamp<int64_t>(work / kMinAttendWork, 1, std::min<int64_t>(num_threads, heads)));
  std::atomic<int64_t> next{0};
  pool().run(threads, [&](int) {
    std::vector<float> scratch(size_t(longest + 2 * a.dh));
    for (int64_t i = next.fetch_add(1); i < heads; i = next.fetch_add(1))
      attend_head(a, i / a.h, i % a.h, scratch.data(), scratch.data() + longest,
                  scratch.data() + longest + a.dh);
  });
}

namespace {

// A whole layer in one call (no accumulator to add into): every expert a token is routed to must be passed.
void check_routed(const char* op, const int64_t* ids, int64_t n, int64_t k, const std::vector<int64_t>& experts) {
  for (int64_t i = 0; i < n * k; ++i)
    MOE_CHECK(std::find(experts.begin(), experts.end(), ids[i]) != experts.end(),
              op << ": token " << i / k << " is routed to expert " << ids[i] << ", which is not among the experts "
                 << "passed");
}

}  // namespace

void moe_experts_bf16(const MoeArgs& a, int num_threads) {
  MOE_CHECK(a.n >= 0 && a.k >= 1 && a.d >= 1 && a.inter >= 1 && a.experts.size() == a.packed.size(),
            "moe_experts_bf16: bad sizes n=" << a.n << " k=" << a.k << " d=" << a.d << " inter=" << a.inter
                                             << " experts=" << a.experts.size() << " packed=" << a.packed.size());
  MOE_CHECK(a.acc || a.out, "moe_experts_bf16: give an accumulator, an output, or both");
  if (!a.acc) check_routed("moe_experts_bf16", a.ids, a.n, a.k, a.experts);
  std::vector<float> own(a.acc ? 0 : size_t(a.n * a.d), 0.0f);
  float* acc = a.acc ? a.acc : own.data();
  std::vector<uint16_t> xe(size_t(a.n * a.d)), gu(size_t(a.n * 2 * a.inter)), hid(size_t(a.n * a.inter)),
      ye(size_t(a.n * a.d));
  std::vector<int64_t> tok;
  std::vector<float> wt;
  for (size_t e = 0; e < a.experts.size(); ++e) {
    tok.clear(), wt.clear();
    for (int64_t t = 0; t < a.n; ++t)
      for (int64_t j = 0; j < a.k; ++j)
        if (a.ids[t * a.k + j] == a.experts[e]) tok.push_back(t), wt.push_back(a.weights[t * a.k + j]);
    const int64_t c = int64_t(tok.size());
    if (c == 0) continue;
    for (int64_t i = 0; i < c; ++i) std::memcpy(&xe[i * a.d], a.x + tok[i] * a.d, size_t(a.d) * 2);
    const uint16_t* w = a.packed[e];
    gemv(xe.data(), c, w, 2 * a.inter, a.d, gu.data(), num_threads);                 // [c, 2I]
    for (int64_t i = 0; i < c; ++i)
      silu_mul(&gu[i * 2 * a.inter], &gu[i * 2 * a.inter + a.inter], a.inter, &hid[i * a.inter]);
    gemv(hid.data(), c, w + 2 * a.inter * a.d, a.d, a.inter, ye.data(), num_threads);   // [c, d]
    for (int64_t i = 0; i < c; ++i) {
      float* row = &acc[tok[i] * a.d];
      for (int64_t j = 0; j < a.d; ++j) row[j] += bf(ye[i * a.d + j]) * wt[i];
    }
  }
  if (a.out)
    for (int64_t i = 0; i < a.n * a.d; ++i) a.out[i] = to_bf(acc[i]);
}

void moe_experts_quant(const MoeQuantArgs& a, int num_threads) {
  const size_t ne = a.experts.size();
  MOE_CHECK(a.n >= 0 && a.k >= 1 && a.d >= 1 && a.inter >= 1 && a.w1.size() == ne && a.w2.size() == ne,
            "moe_experts_quant: bad sizes n=" << a.n << " k=" << a.k << " d=" << a.d << " inter=" << a.inter
                                              << " experts=" << ne << " w1=" << a.w1.size() << " w2=" << a.w2.size());
  MOE_CHECK(a.acc || a.out, "moe_experts_quant: give an accumulator, an output, or both");
  for (size_t e = 0; e < ne; ++e)
    MOE_CHECK(a.w1[e].rows == 2 * a.inter && a.w1[e].cols == a.d && a.w2[e].rows == a.d && a.w2[e].cols == a.inter,
              "moe_experts_quant: expert " << a.experts[e] << " has W1 [" << a.w1[e].rows << ", " << a.w1[e].cols
                                           << "] and W2 [" << a.w2[e].rows << ", " << a.w2[e].cols << "], expected ["
                                           << 2 * a.inter << ", " << a.d << "] and [" << a.d << ", " << a.inter << "]");
  if (!a.acc) check_routed("moe_experts_quant", a.ids, a.n, a.k, a.experts);
  std::vector<float> own(a.acc ? 0 : size_t(a.n * a.d), 0.0f);
  float* acc = a.acc ? a.acc : own.data();
  std::vector<std::vector<int64_t>> tok(ne);
  std::vector<std::vector<float>> wt(ne);
  std::vector<std::vector<float>> xin(ne), gu(ne), hid(ne), ye(ne);
  std::vector<std::unique_ptr<QLinearJob>> jobs;
  std::vector<const QLinearJob*> run;
  for (size_t e = 0; e < ne; ++e) {   // W1 of every expert with tokens
    for (int64_t t = 0; t < a.n; ++t)
      for (int64_t j = 0; j < a.k; ++j)
        if (a.ids[t * a.k + j] == a.experts[e]) tok[e].push_back(t), wt[e].push_back(a.weights[t * a.k + j]);
    const int64_t c = int64_t(tok[e].size());
    if (c == 0) continue;
    xin[e].resize(size_t(c * a.d));
    for (int64_t i = 0; i < c; ++i)
      for (int64_t j = 0; j < a.d; ++j) xin[e][size_t(i * a.d + j)] = bf(a.x[tok[e][size_t(i)] * a.d + j]);
    gu[e].resize(size_t(c * 2 * a.inter));
    jobs.push_back(make_qlinear_job(xin[e].data(), c, a.w1[e], gu[e].data(), a.isa, true));
    run.push_back(jobs.back().get());
  }
  run_qlinear_jobs(run, num_threads);
  run.clear();
  std::vector<uint16_t> g16(size_t(2 * a.inter)), h16(size_t(a.inter));
  for (size_t e = 0; e < ne; ++e) {   // SwiGLU, then W2 of every expert
    const int64_t c = int64_t(tok[e].size());
    if (c == 0) continue;
    hid[e].resize(size_t(c * a.inter));
    for (int64_t i = 0; i < c; ++i) {
      const float* row = gu[e].data() + i * 2 * a.inter;
      for (int64_t j = 0; j < 2 * a.inter; ++j) g16[size_t(j)] = to_bf(row[j]);
      silu_mul(g16.data(), g16.data() + a.inter, a.inter, h16.data());
      for (int64_t j = 0; j < a.inter; ++j) hid[e][size_t(i * a.inter + j)] = bf(h16[size_t(j)]);
    }
    ye[e].resize(size_t(c * a.d));
    jobs.push_back(make_qlinear_job(hid[e].data(), c, a.w2[e], ye[e].data(), a.isa, true));
    run.push_back(jobs.back().get());
  }
  run_qlinear_jobs(run, num_threads);
  for (size_t e = 0; e < ne; ++e)     // combine in the given order
    for (size_t i = 0; i < tok[e].size(); ++i) {
      float* row = acc + tok[e][i] * a.d;
      const float* y = ye[e].data() + int64_t(i) * a.d;
      for (int64_t j = 0; j < a.d; ++j) row[j] += bf(to_bf(y[j])) * wt[e][i];
    }
  if (a.out)
    for (int64_t i = 0; i < a.n * a.d; ++i) a.out[i] = to_bf(acc[i]);
}

}  // namespace moe
