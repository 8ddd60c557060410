// Python bindings of the CUDA kernels: pointers arrive as integers (tensor.data_ptr()),
// shapes and strides as ints, the stream as cudaStream_t from torch.cuda.current_stream().
// The Python side (pss_kernels/ops/*/cuda.py) checks device, dtype and shapes first.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pss_kernels CUDA kernels (raw pointers in, no torch headers)";
  m.def("cuda_runtime_version", []() {
    int version = 0;
    cudaRuntimeGetVersion(&version);
    return version;
  });
}
