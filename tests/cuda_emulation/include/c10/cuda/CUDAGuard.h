// Emulated CUDA (see gif_emulated_cuda.h): one device, nothing to switch.
#pragma once
#include <c10/core/Device.h>

#include "gif_emulated_cuda.h"

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
};
}  // namespace c10::cuda
