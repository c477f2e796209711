// The CPU row steps for AVX-512 (F, BW, VL, DQ) + FMA, as ATen's AVX512 build (see code_ce_rows.h).
#include "code_ce_rows.h"

#if GIF_CPU_AVX_BUILDS
#pragma GCC target("avx,avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq")
// The pragma enables the instructions, not the macros that ATen's vec headers and sleef.h test.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define __AVX512F__ 1
#define __AVX512BW__ 1
#define __AVX512VL__ 1
#define __AVX512DQ__ 1
#pragma GCC diagnostic ignored "-Wpsabi"  // 512-bit arguments of functions this file never calls
#define CPU_CAPABILITY AVX512
#define CPU_CAPABILITY_AVX512
#include "code_ce_rows_impl.h"
#endif
