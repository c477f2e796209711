// gif_kernels._C: loading it registers torch.ops.gif.*; it also reports how it was built.
#include <torch/extension.h>
#include <torch/version.h>

#include <string>

#ifndef GIF_CUDA_ARCHS
#define GIF_CUDA_ARCHS ""
#endif

namespace gif {
std::string cpu_row_steps_capability();  // csrc/cpu/code_ce_rows.h
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["torch_version"] = TORCH_VERSION;
#ifdef GIF_WITH_CUDA
  info["cuda"] = true;
#else
  info["cuda"] = false;
#endif
  info["cuda_archs"] = std::string(GIF_CUDA_ARCHS);
#ifdef _OPENMP
  info["openmp"] = true;
#else
  info["openmp"] = false;
#endif
  info["cpu_capability"] = gif::cpu_row_steps_capability();
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gif-kernels compiled ops (torch.ops.gif) and build information";
  m.def("build_info", &build_info,
        "dict: torch_version the extension was built against, cuda (whether CUDA kernels were "
        "compiled), cuda_archs (their architectures, e.g. '9.0'), openmp, cpu_capability (the instruction "
        "set the CPU kernels' row steps run with: DEFAULT, AVX2 or AVX512)");
}
