// bf16 weights times a few activation rows on the CPU (decode: n = 1..8 tokens; any n works):
//
//   y [n, rows] = x [n, cols] @ W^T (+ b)      W bf16 [rows, cols] row-major, b bf16 [rows] or none
//
// x is bf16 or float32 and y has x's dtype. Products and sums are float32; a bf16 y is rounded once, at the
// end (round to nearest even, as torch). Each row is read from memory once per call; blocks of up to 4 tokens
// share every load of it (further blocks re-read the row from L1/L2).
//
// Paths (x86-64, chosen at run time from the CPU; the build needs none of these ISAs):
//   avx512bf16  vdpbf16ps on bf16 pairs of W and x (bf16 x only; float32 x takes the avx512 path, since
//               rounding x to bf16 would lose precision); denormal inputs and results flush to zero there
//   avx512      W widened to float32 by a 16-bit shift (even columns) and a mask (odd columns), FMA against
//               x deinterleaved once per call into even and odd columns
//   avx2        the same with 256-bit vectors (FMA)
//   scalar      the readable C++ twin, in the same per-row order as the avx512/avx2 paths' tails
// Rows are split over up to `num_threads` threads of the shared pool (thread_pool.h); each output row is
// computed by one thread in a fixed order, so results do not depend on the thread count.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace moe {

struct Bf16LinearArgs {
  const void* x = nullptr;        // [n, cols], bf16 bits or float32
  bool x_f32 = false;             // x and y are float32 (else bf16)
  int64_t n = 0;
  const uint16_t* w = nullptr;    // bf16 bits [rows, cols], row-major, contiguous
  const uint16_t* bias = nullptr; // bf16 bits [rows], or null
  int64_t rows = 0;
  int64_t cols = 0;
  void* y = nullptr;              // [n, rows], x's dtype
};

// Throws std::invalid_argument naming the bad argument (checked before any work). isa: "auto" (the best
// this CPU runs for x's dtype) or one of bf16_linear_isas().
void bf16_linear(const Bf16LinearArgs& a, int num_threads, const std::string& isa = "auto");

// The paths bf16_linear can take on this CPU, fastest first ("scalar" is always last).
std::vector<std::string> bf16_linear_isas();

}  // namespace moe
