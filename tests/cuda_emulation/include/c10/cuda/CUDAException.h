// Emulated CUDA (see gif_emulated_cuda.h): error checks of the CUDA runtime calls that exist there.
#pragma once
#include "gif_emulated_cuda.h"

#define C10_CUDA_CHECK(expr) TORCH_CHECK((expr) == cudaSuccess, "emulated CUDA: ", #expr, " failed")
#define C10_CUDA_KERNEL_LAUNCH_CHECK() \
  do {                                 \
  } while (0)
