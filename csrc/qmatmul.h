// Fused dequantize + matmul on the CPU for group-wise quantized matrices (moe_engine/quant/format.py):
//
//   y [n, rows] = x [n, cols] @ W^T,   W[r, c] = (q[r, c] - zero[r, c / G]) * scale[r, c / G]
//
// computed without a dense W, as
//
//   y[t, r] = sum_c (q[r, c] * scale[r, c / G]) * x[t, c]  -  sum_g scale[r, g] * zero[r, g] * xsum[t, g]
//
// where xsum[t, g] = sum_{c in group g} x[t, c] is computed once per call. Codes are unpacked from their
// bit planes in registers (8 -> one 8-bit plane; 4 -> one 4-bit plane; 3 -> a 2-bit plane with the low
// bits and a 1-bit plane with bit 2; 2 -> one 2-bit plane; a w-bit plane packs 8/w columns per byte,
// lowest column in the lowest bits). float32 throughout; q * scale is exact in float32, so the only
// roundings are those of the accumulation. Decode shapes (n = 1..8) are the target: every code is read
// once per block of 8 tokens, so larger n works but re-reads the codes n/8 times.
//
// Paths: AVX-512F, AVX2+FMA+F16C (x86-64, chosen at run time from the CPU) and portable scalar C++.
// Rows are split across up to `num_threads` threads of a persistent pool (the caller's thread is one of
// them; small matrices use fewer), which take chunks of rows from a shared counter; each row is computed
// by one thread in a fixed order, so results do not depend on the thread count or on who took which rows.
// Nothing here allocates the output or owns any input: pointers are the caller's (torch tensors).
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace moe {

// One quantized matrix [rows, cols]: every array row-major and contiguous.
struct QMatrixView {
  const uint8_t* planes[2] = {nullptr, nullptr};  // low plane [rows, cols*w/8]; the 1-bit plane (3 bits only)
  const uint16_t* scales = nullptr;               // float16 bits [rows, cols / group]
  const uint16_t* zeros = nullptr;                // float16 bits [rows, cols / group], integer values
  int64_t rows = 0;
  int64_t cols = 0;
  int bits = 0;                                   // 2, 3, 4 or 8
  int group = 0;                                  // 32, 64 or 128
};

// y [n, rows] = x [n, cols] @ W^T (float32, contiguous). isa: "auto" (the best this CPU runs) or one of
// qlinear_isas(); a path that cannot take a shape falls back to the next one (2/3-bit codes need cols a
// multiple of 64 for "avx512"; the integer path of 4/8-bit codes needs cols a multiple of 128 for the
// AVX-512 paths and 64 (4 bits) or 32 (8 bits) for the AVX2 ones). Throws std::invalid_argument naming the bad argument (checked before
// any work).
//
// With int8_acts (the caller's activations are bf16/fp16 anyway: the runtime asks for it then; float32 callers
// keep the exact float path), 4- and 8-bit codes take the integer path (qdot.cpp): x is quantized per block of 32 columns to int8
// (scale = max|x| / 127, codes = round-half-even(x / scale)), and each block's dot product of codes is an
// exact integer sum (VNNI vpdpbusd, or vpmaddubsw + vpmaddwd), scaled once per block in float32. Otherwise
// (and always for 2/3-bit codes) the float path described above. Int8 activations per block of 32 keep about
// the precision bf16 activations have (a step of max|x| / 127 within a block vs 2^-8 relative). The torch twins (moe_engine/_ops/qmatrix.py:
// qlinear_int8_reference, qlinear_reference) compute the same values up to float32 summation order.
void qlinear_f32(const float* x, int64_t n, const QMatrixView& w, float* y, int num_threads,
                 const std::string& isa = "auto", bool int8_acts = false);

// The paths qlinear_f32 can take on this CPU, fastest first ("scalar" is always last): "avx512vnni",
// "avx512", "avxvnni" (AVX2 with VEX VNNI: client CPUs without AVX-512), "avx2", "scalar". The float path of
// 2/3-bit codes runs "avx512vnni" as "avx512" and "avxvnni" as "avx2".
std::vector<std::string> qlinear_isas();

// One prepared product y = x @ W^T: activations converted once when it is made; its rows are computed by
// rows(r0, r1, scratch) from any thread (each output row by one call, in a fixed order). Jobs let one pool
// run cover several matrices (a MoE layer's experts) instead of one run per matrix.
class QLinearJob {
 public:
  virtual ~QLinearJob() = default;
  virtual void rows(int64_t r0, int64_t r1, float* scratch) const = 0;
  int64_t num_rows = 0;        // rows of W (and of y's columns)
  int64_t scratch_floats = 0;  // scratch a thread needs for rows()
  int64_t work = 0;            // ~ codes * (n + 1) / 2, for the thread count
};

// Checks the arguments (as qlinear_f32) and prepares the job; x must stay alive until it has run, y is written
// by rows().
std::unique_ptr<QLinearJob> make_qlinear_job(const float* x, int64_t n, const QMatrixView& w, float* y,
                                             const std::string& isa = "auto", bool int8_acts = false);

// Runs every row of every job over up to num_threads threads of the pool (fewer for small work).
void run_qlinear_jobs(const std::vector<const QLinearJob*>& jobs, int num_threads);

// The integer path's pieces (qdot.cpp), used by make_qlinear_job for 4/8-bit codes.
std::unique_ptr<QLinearJob> make_qdot_job(const float* x, int64_t n, const QMatrixView& w, float* y,
                                          const std::string& isa);
std::vector<std::string> qdot_isas();

}  // namespace moe
