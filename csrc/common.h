// Shared helpers for the moe_engine._C extension: argument checks that raise clear Python errors.
#pragma once

#include <cerrno>
#include <cstring>
#include <sstream>
#include <stdexcept>
#include <string>

namespace moe {

// Page size used for O_DIRECT offsets, lengths and buffer addresses; 4096 satisfies every
// logical block size Linux filesystems use (512 or 4096).
constexpr size_t kIoAlignment = 4096;

// Raised when an argument is out of range; pybind11 maps std::invalid_argument to ValueError.
#define MOE_CHECK(cond, msg)                                   \
  do {                                                         \
    if (!(cond)) {                                             \
      std::ostringstream moe_check_os_;                        \
      moe_check_os_ << msg;                                    \
      throw std::invalid_argument(moe_check_os_.str());        \
    }                                                          \
  } while (0)

inline std::string errno_string(int err) {
  char buf[256];
  // GNU strerror_r returns a pointer that may or may not be buf.
  const char* s = strerror_r(err, buf, sizeof(buf));
  return std::string(s);
}

inline bool is_power_of_two(size_t x) { return x != 0 && (x & (x - 1)) == 0; }

inline size_t round_down(size_t x, size_t a) { return x & ~(a - 1); }
inline size_t round_up(size_t x, size_t a) { return (x + a - 1) & ~(a - 1); }

}  // namespace moe
