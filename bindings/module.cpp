// The vlmkit._C extension: version, threads, and the bound modules.
#include "common.h"
#include "vlmkit/runtime.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "vlmkit: vision-language models on LibTorch (compiled core)";
  m.attr("__version__") = vlmkit::version();
  m.attr("torch_version") = vlmkit::torch_version();

  m.def("set_num_threads", &vlmkit::set_num_threads, py::arg("torch_threads"),
        py::arg("blas_threads") = 0,
        "Set torch intra-op threads and OpenBLAS threads (<= 0 leaves one unchanged).");
  auto info_to_dict = [](const vlmkit::ThreadInfo& info) {
    py::dict d;
    d["torch_threads"] = info.torch_threads;
    d["blas_threads"] = info.blas_threads;
    d["blas"] = info.blas;
    d["blas_config"] = info.blas_config;
    return d;
  };
  m.def("thread_info", [info_to_dict]() { return info_to_dict(vlmkit::thread_info()); },
        "Threads in force and which BLAS serves LibTorch.");
  m.def("apply_default_threads",
        [info_to_dict]() { return info_to_dict(vlmkit::apply_default_threads()); },
        "Apply vlmkit's thread policy: 1 torch thread, OpenBLAS on every core "
        "(VLMKIT_TORCH_THREADS / VLMKIT_BLAS_THREADS override).");

  vlmkit::bindings::ensure_module_base(m);
  vlmkit::bindings::bind_module_functions(m);
  vlmkit::bindings::bind_blocks(m);
  vlmkit::bindings::bind_models(m);
  vlmkit::bindings::bind_generative(m);
  vlmkit::bindings::bind_train(m);
#ifdef VLMKIT_WITH_OPENCV
  vlmkit::bindings::bind_data(m);
  m.attr("with_opencv") = true;
#else
  m.attr("with_opencv") = false;
#endif
}
