// gif_kernels._C: loading it registers torch.ops.gif.*; it also reports how it was built.
#include <torch/extension.h>
#include <torch/version.h>

#ifndef GIF_CUDA_ARCHS
#define GIF_CUDA_ARCHS ""
#endif

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
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gif-kernels compiled ops (torch.ops.gif) and build information";
  m.def("build_info", &build_info,
        "dict: torch_version the extension was built against, cuda (whether CUDA kernels were "
        "compiled), cuda_archs (their architectures, e.g. '9.0'), openmp");
}
