// Host-to-device copies on a caller-given CUDA stream, and events to order work on them.
// Compiled only with -DMOE_WITH_CUDA. Streams are passed as raw cudaStream_t handles (integers,
// e.g. torch.cuda.Stream.cuda_stream); the copy and the event use whatever device that stream and
// the thread's current context belong to. Nothing here allocates device memory.
#pragma once

#ifdef MOE_WITH_CUDA

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace moe {

int cuda_device_count();  // 0 when no driver or no device is visible

// Queue a copy of nbytes from host src (should be pinned, or the copy is synchronous) to device dst.
void copy_h2d_async(uintptr_t src, uintptr_t dst, size_t nbytes, uintptr_t stream);

// A CUDA event without timing, created on the current device.
class CudaEvent {
 public:
  CudaEvent();
  ~CudaEvent();
  CudaEvent(const CudaEvent&) = delete;
  CudaEvent& operator=(const CudaEvent&) = delete;

  void record(uintptr_t stream);     // marks the point after the work queued so far on stream
  bool query();                      // true once that work finished
  void synchronize();                // blocks the host until then
  void wait_on(uintptr_t stream);    // makes later work on `stream` wait for the event
  uintptr_t handle() const { return reinterpret_cast<uintptr_t>(event_); }

 private:
  cudaEvent_t event_ = nullptr;
};

}  // namespace moe

#endif  // MOE_WITH_CUDA
