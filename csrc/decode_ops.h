// Fused CPU ops of one bf16 decode step (one new token per sequence), each replacing a chain of small torch ops
// whose per-call overhead, not arithmetic, dominated decode time:
//
//   rms_norm_bf16      y = bf16(w * bf16(x * rsqrt(mean(x^2) + eps)))          statistics in float32
//                      (optionally after a residual add: x = bf16(x + delta), written back for the caller)
//   route_softmax_topk router logits -> float32 softmax -> top k (ties: lower id first) -> optional renormalize
//   rope_qkv_bf16      fused q|k|v projection row -> rotated q, rotated k, v    (rotate-half, first `rot` dims)
//   attend_decode_bf16 one query per sequence against its cached keys/values (GQA, boolean mask, optional sinks)
//   moe_experts_bf16   a layer's routed experts for a few tokens: gate_up GEMV -> SiLU(gate) * up -> down GEMV ->
//                      sum over a token's experts weighted by its router weights (float32, in the given order)
//
// bf16 values are uint16_t bit patterns. Every bf16 result is rounded the way the torch ops it replaces round
// (to nearest even, after each op torch would round after), so the torch twins in moe_engine/_ops/decode.py
// match up to float32 summation order. Results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "qmatmul.h"

namespace moe {

// With `delta` non-null: sum [n, d] = bf16(x + delta) is computed first, stored in `sum` and normalized.
void rms_norm_bf16(const uint16_t* x, const uint16_t* delta, const uint16_t* w, int64_t n, int64_t d, float eps,
                   uint16_t* sum, uint16_t* y);

// logits [n, e] bf16 -> weights [n, k] float32 (descending), ids [n, k] int64.
void route_softmax_topk(const uint16_t* logits, int64_t n, int64_t e, int64_t k, bool normalize, float* weights,
                        int64_t* ids);

// qkv [b, (h + 2 hkv) * dh] (q heads, then k heads, then v heads); cos, sin [b, rot] bf16 ->
// q [b, h, dh] (contiguous); k and v head g of row r at k + r * k_sb + g * k_sh (likewise v): e.g. a KV cache's
// new slot, written in place.
void rope_qkv_bf16(const uint16_t* qkv, const uint16_t* cos, const uint16_t* sin, int64_t b, int64_t h,
                   int64_t hkv, int64_t dh, int64_t rot, uint16_t* q, uint16_t* k, int64_t k_sb, int64_t k_sh,
                   uint16_t* v, int64_t v_sb, int64_t v_sh);

struct AttendRow {                              // one sequence's cached keys/values and mask
  const uint16_t* k = nullptr;                  // element (g, s, i) at k[g*k_sh + s*k_ss + i] (k_ss: AttendArgs)
  const uint16_t* v = nullptr;                  // likewise with v_sh, v_ss
  int64_t k_sh = 0, v_sh = 0;
  const bool* mask = nullptr;                   // [s]: true = attend
  int64_t s = 0;                                // keys of this row (rows may differ: each sequence's own cache)
};

struct AttendArgs {
  const uint16_t* q = nullptr;                  // [b, h, dh] contiguous, b = rows.size()
  std::vector<AttendRow> rows;
  int64_t k_ss = 0, v_ss = 0;                   // slot strides, shared by every row
  const float* sinks = nullptr;                 // [h] sink logits, or null
  int64_t h = 0, hkv = 0, dh = 0;
  float scale = 1.0f;
  uint16_t* out = nullptr;                      // [b, h * dh]
};

// Throws std::invalid_argument on bad sizes (h not a multiple of hkv, a row with s < 1, ...).
void attend_decode_bf16(const AttendArgs& a, int num_threads);

struct MoeArgs {
  const uint16_t* x = nullptr;                  // [n, d]
  const int64_t* ids = nullptr;                 // [n, k] expert ids
  const float* weights = nullptr;               // [n, k] combine weights (already scaled)
  int64_t n = 0, k = 0, d = 0, inter = 0;
  std::vector<int64_t> experts;                 // the experts to run, in accumulation order
  std::vector<const uint16_t*> packed;          // their packed buffers: gate [I, d] | up [I, d] | down [d, I]
  float* acc = nullptr;                         // [n, d] float32 sums to add into (kept across calls), or null
  uint16_t* out = nullptr;                      // [n, d] the sums rounded to bf16, or null (acc given)
};

// Either `acc` or `out` (or both) must be given: with acc, a caller can run a layer's experts one call at a time
// (each as soon as its buffer is ready) and round at the end. Throws std::invalid_argument when an id in `ids` is not among `experts` or sizes are bad.
void moe_experts_bf16(const MoeArgs& a, int num_threads);

// moe_experts_bf16 over quantized experts (qmatmul.h's format, any mix of widths; 4/8-bit codes on qlinear's
// integer path, since the activations are bf16): per expert, gate_up =
// bf16(x @ W1^T), h = bf16(bf16(silu(gate)) * up), y = bf16(h @ W2^T), acc += y * weight, as
// quant/kernels.quant_expert_ffn rounds. Two pool runs for the whole layer: every expert's W1 rows, then every
// W2's (qlinear jobs), so threads are woken twice per layer, not twice per expert.
struct MoeQuantArgs {
  const uint16_t* x = nullptr;                  // [n, d] bf16
  const int64_t* ids = nullptr;                 // [n, k]
  const float* weights = nullptr;               // [n, k]
  int64_t n = 0, k = 0, d = 0, inter = 0;
  std::vector<int64_t> experts;                 // the experts to run, in accumulation order
  std::vector<QMatrixView> w1, w2;              // theirs: gate|up [2 inter, d], down [d, inter]
  float* acc = nullptr;                         // as MoeArgs
  uint16_t* out = nullptr;
  std::string isa = "auto";                     // qlinear's path (a test hook)
};

void moe_experts_quant(const MoeQuantArgs& a, int num_threads);

}  // namespace moe
