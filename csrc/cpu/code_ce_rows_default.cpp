// The CPU row steps for the baseline instruction set, and the choice among the builds (code_ce_rows.h).
#include "code_ce_rows.h"

#define CPU_CAPABILITY DEFAULT
#include "code_ce_rows_impl.h"

#include <ATen/Version.h>

namespace gif {

std::string cpu_row_steps_capability() {
#if GIF_CPU_AVX_BUILDS
  const std::string ats = at::get_cpu_capability();
  if (ats == "AVX512" || ats == "AVX2") return ats;
#endif
  return "DEFAULT";
}

const RowSteps& cpu_row_steps() {
  static const RowSteps steps = [] {
    const std::string capability = cpu_row_steps_capability();
#if GIF_CPU_AVX_BUILDS
    if (capability == "AVX512") return AVX512::row_steps();
    if (capability == "AVX2") return AVX2::row_steps();
#endif
    return DEFAULT::row_steps();
  }();
  return steps;
}

}  // namespace gif
