// Emulated CUDA (see gif_emulated_cuda.h): one device, one stream; launches run to completion.
#pragma once
#include <c10/core/Device.h>

#include "gif_emulated_cuda.h"

namespace c10::cuda {
struct CUDAStream {};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
inline c10::DeviceIndex current_device() { return 0; }
}  // namespace c10::cuda
