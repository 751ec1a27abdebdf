#include "aligned_buffer.h"

#include <cstdlib>
#include <new>
#include <stdexcept>
#include <string>

#include "common.h"

#ifdef MOE_WITH_CUDA
#include <cuda_runtime.h>
#endif

namespace moe {

namespace {

void* allocate_host(size_t nbytes, size_t alignment) {
  void* p = nullptr;
  int rc = posix_memalign(&p, alignment, nbytes);
  if (rc != 0) {
    throw std::runtime_error("posix_memalign(" + std::to_string(nbytes) + " bytes, alignment " +
                             std::to_string(alignment) + ") failed: " + errno_string(rc));
  }
  return p;
}

#ifdef MOE_WITH_CUDA
// cudaHostAlloc only guarantees page alignment: over-allocate and round up for larger alignments.
void* allocate_pinned(size_t total) {
  void* p = nullptr;
  cudaError_t err = cudaHostAlloc(&p, total, cudaHostAllocDefault);
  if (err != cudaSuccess) {
    cudaGetLastError();  // reset the runtime's last error so later calls do not report it
    throw std::runtime_error("cudaHostAlloc(" + std::to_string(total) + " bytes) failed: " +
                             cudaGetErrorString(err) + " (is a CUDA device visible? pass pinned=False)");
  }
  return p;
}
#endif

}  // namespace

AlignedBuffer::AlignedBuffer(size_t nbytes, size_t alignment, bool pinned)
    : nbytes_(nbytes), alignment_(alignment), pinned_(pinned) {
  MOE_CHECK(nbytes > 0, "AlignedBuffer: nbytes must be > 0, got " << nbytes);
  MOE_CHECK(is_power_of_two(alignment), "AlignedBuffer: alignment must be a power of two, got " << alignment);
  if (alignment_ < sizeof(void*)) alignment_ = sizeof(void*);  // posix_memalign's minimum
  if (!pinned) {
    base_ = allocate_host(nbytes, alignment_);
    data_ = base_;
    return;
  }
#ifdef MOE_WITH_CUDA
  const size_t slack = alignment_ > kIoAlignment ? alignment_ : 0;
  base_ = allocate_pinned(nbytes + slack);
  data_ = reinterpret_cast<void*>(round_up(reinterpret_cast<uintptr_t>(base_), alignment_));
#else
  throw std::runtime_error("AlignedBuffer: pinned=True needs moe_engine._C built with CUDA");
#endif
}

AlignedBuffer::~AlignedBuffer() {
  if (base_ == nullptr) return;
#ifdef MOE_WITH_CUDA
  if (pinned_) {
    cudaFreeHost(base_);
    return;
  }
#endif
  std::free(base_);
}

#ifdef MOE_WITH_CUDA
void register_pinned(uintptr_t ptr, size_t nbytes) {
  MOE_CHECK(ptr != 0, "register_pinned: null pointer");
  MOE_CHECK(nbytes > 0, "register_pinned: nbytes must be > 0");
  cudaError_t err = cudaHostRegister(reinterpret_cast<void*>(ptr), nbytes, cudaHostRegisterDefault);
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error("cudaHostRegister(" + std::to_string(nbytes) + " bytes) failed: " +
                             cudaGetErrorString(err));
  }
}

void unregister_pinned(uintptr_t ptr) {
  MOE_CHECK(ptr != 0, "unregister_pinned: null pointer");
  cudaError_t err = cudaHostUnregister(reinterpret_cast<void*>(ptr));
  if (err != cudaSuccess) {
    cudaGetLastError();
    throw std::runtime_error(std::string("cudaHostUnregister failed: ") + cudaGetErrorString(err));
  }
}
#endif  // MOE_WITH_CUDA

}  // namespace moe
