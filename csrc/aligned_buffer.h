// AlignedBuffer: one heap allocation of nbytes whose address is a multiple of `alignment`,
// optionally page-locked (cudaHostAlloc) when the extension is built with CUDA. It exposes the
// Python buffer protocol, so torch.frombuffer(buf, dtype=torch.uint8) wraps it without a copy and
// keeps it alive. It does not zero the memory and cannot be resized.
#pragma once

#include <cstddef>
#include <cstdint>

namespace moe {

class AlignedBuffer {
 public:
  AlignedBuffer(size_t nbytes, size_t alignment, bool pinned);
  ~AlignedBuffer();
  AlignedBuffer(const AlignedBuffer&) = delete;
  AlignedBuffer& operator=(const AlignedBuffer&) = delete;

  void* data() const { return data_; }
  size_t nbytes() const { return nbytes_; }
  size_t alignment() const { return alignment_; }
  bool pinned() const { return pinned_; }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(data_); }

 private:
  void* base_ = nullptr;  // what the allocator returned (freed in the destructor)
  void* data_ = nullptr;  // base_ rounded up to alignment_
  size_t nbytes_ = 0;
  size_t alignment_ = 0;
  bool pinned_ = false;
};

#ifdef MOE_WITH_CUDA
// Page-lock (or unlock) memory the caller owns, e.g. a torch tensor, so device copies from it can
// run asynchronously. Absent from builds without CUDA.
void register_pinned(uintptr_t ptr, size_t nbytes);
void unregister_pinned(uintptr_t ptr);
#endif

}  // namespace moe
