// The CPU row steps for AVX2 + FMA (see code_ce_rows.h).
#include "code_ce_rows.h"

#if GIF_CPU_AVX_BUILDS
#pragma GCC target("avx,avx2,fma,f16c")
// The pragma enables the instructions, not the macros that ATen's vec headers and sleef.h test.
#define __AVX__ 1
#define __AVX2__ 1
#define __FMA__ 1
#define __F16C__ 1
#define CPU_CAPABILITY AVX2
#define CPU_CAPABILITY_AVX2
#include "code_ce_rows_impl.h"
#endif
