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

// y [n, rows] = x [n, cols] @ W^T (float32, contiguous). isa: "auto" (the best this CPU runs), "avx512",
// "avx2" or "scalar" ("avx512" runs 2/3-bit codes through the AVX2 path when cols is not a multiple of
// 64). Throws std::invalid_argument naming the bad argument (checked before any work).
void qlinear_f32(const float* x, int64_t n, const QMatrixView& w, float* y, int num_threads,
                 const std::string& isa = "auto");

// The paths qlinear_f32 can take on this CPU, fastest first ("scalar" is always last).
std::vector<std::string> qlinear_isas();

}  // namespace moe
