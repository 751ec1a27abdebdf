#ifdef MOE_WITH_CUDA

#include "cuda_ops.h"

#include <stdexcept>
#include <string>

#include "common.h"

namespace moe {

namespace {

void check_cuda(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return;
  cudaGetLastError();  // reset the runtime's last error so later calls do not report it
  throw std::runtime_error(std::string(what) + " failed: " + cudaGetErrorString(err));
}

cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

}  // namespace

int cuda_device_count() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

void copy_h2d_async(uintptr_t src, uintptr_t dst, size_t nbytes, uintptr_t stream) {
  MOE_CHECK(src != 0 && dst != 0, "copy_h2d_async: null source or destination pointer");
  if (nbytes == 0) return;
  check_cuda(cudaMemcpyAsync(reinterpret_cast<void*>(dst), reinterpret_cast<const void*>(src), nbytes,
                             cudaMemcpyHostToDevice, as_stream(stream)),
             "cudaMemcpyAsync(host to device)");
}

CudaEvent::CudaEvent() { check_cuda(cudaEventCreateWithFlags(&event_, cudaEventDisableTiming), "cudaEventCreate"); }

CudaEvent::~CudaEvent() {
  if (event_ != nullptr) cudaEventDestroy(event_);
}

void CudaEvent::record(uintptr_t stream) { check_cuda(cudaEventRecord(event_, as_stream(stream)), "cudaEventRecord"); }

bool CudaEvent::query() {
  cudaError_t err = cudaEventQuery(event_);
  if (err == cudaErrorNotReady) {
    cudaGetLastError();
    return false;
  }
  check_cuda(err, "cudaEventQuery");
  return true;
}

void CudaEvent::synchronize() { check_cuda(cudaEventSynchronize(event_), "cudaEventSynchronize"); }

void CudaEvent::wait_on(uintptr_t stream) {
  check_cuda(cudaStreamWaitEvent(as_stream(stream), event_, 0), "cudaStreamWaitEvent");
}

}  // namespace moe

#endif  // MOE_WITH_CUDA
