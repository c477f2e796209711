// The CPU row steps of fused_code_ce's GEMM driver (code_ce_gemm.h), built once per instruction set the
// way ATen builds its native/cpu kernels: code_ce_rows_impl.h is compiled by code_ce_rows_default.cpp,
// code_ce_rows_avx2.cpp and code_ce_rows_avx512.cpp, each in its own namespace, and cpu_row_steps()
// picks the one for the instruction set ATen runs with (at::get_cpu_capability(), which
// ATEN_CPU_CAPABILITY overrides). Without it exp / log would stay scalar: the baseline x86-64 build
// has no vector instructions for them.
//
// Each AVX file enables its instructions with GCC's target pragma after including this header, so
// that everything included here is compiled for the baseline only: an inline function compiled in
// two files for two instruction sets is one symbol to the linker, which may keep either copy. So this
// header also includes what ATen's vec headers bring besides themselves (checked for torch 2.13 / 2.14).
#pragma once

#include <ATen/AccumulateType.h>
#include <ATen/ATen.h>
#include <ATen/NumericUtils.h>
#include <ATen/Parallel.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/MathConstants.h>
#include <c10/util/copysign.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <vector>

#include "../code_ce_gemm.h"

// The AVX builds need GCC on x86-64 (the target pragma); elsewhere only the baseline one is built.
#if (defined(__x86_64__) || defined(_M_X64)) && defined(__GNUC__) && !defined(__clang__)
#define GIF_CPU_AVX_BUILDS 1
#else
#define GIF_CPU_AVX_BUILDS 0
#endif

namespace gif {

struct RowSteps {
  ForwardRowStep forward;
  BackwardRowStep backward;
  ForwardGradRowStep forward_grad;
  NormalStep normal_component;
};

namespace DEFAULT {
RowSteps row_steps();
}
#if GIF_CPU_AVX_BUILDS
namespace AVX2 {
RowSteps row_steps();
}
namespace AVX512 {
RowSteps row_steps();
}
#endif

// The row steps for this machine's instruction set (chosen once).
const RowSteps& cpu_row_steps();

// Which build cpu_row_steps() runs: "DEFAULT", "AVX2" or "AVX512".
std::string cpu_row_steps_capability();

}  // namespace gif
