// Python bindings of the CUDA kernels: pointers arrive as integers (tensor.data_ptr()),
// shapes and strides as ints, the stream as cudaStream_t from torch.cuda.current_stream().
// The Python side (pss_kernels/ops/*/cuda.py) checks device, dtype and shapes first.
#include <pybind11/pybind11.h>
#include <cuda_runtime.h>

#include "sampling/sample_patches.h"

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "pss_kernels CUDA kernels (raw pointers in, no torch headers)";
  m.def("cuda_runtime_version", []() {
    int version = 0;
    cudaRuntimeGetVersion(&version);
    return version;
  });

  m.attr("SAMPLE_PATCHES_MAX_PATCHES") = pss::kMaxPatches;
  m.def("sample_patches_forward_workspace_bytes", &pss::sample_patches_forward_workspace_bytes,
        py::arg("batch"), py::arg("num_tokens"), py::arg("num_prefix"), py::arg("scorer"),
        "Device bytes of workspace sample_patches_forward needs on the current device (0: none).");
  m.def("sample_patches_forward", &pss::sample_patches_forward, py::arg("x"), py::arg("scores"),
        py::arg("x_kept"), py::arg("index"), py::arg("slot"), py::arg("workspace"), py::arg("batch"),
        py::arg("num_tokens"), py::arg("channels"), py::arg("num_prefix"), py::arg("num_kept"), py::arg("dtype"), py::arg("scorer"),
        py::arg("spatial"), py::arg("stream"),
        "x (B, N, C) -> x_kept (B, k, C), index (B, k) int64, slot (B, N) int32; contiguous device pointers. "
        "dtype: 0 float32, 1 float16, 2 bfloat16; scorer: 0 l1, 1 l2, 2 given (scores (B, N - num_prefix) float32); "
        "workspace: sample_patches_forward_workspace_bytes() bytes.");
  m.def("sample_patches_backward", &pss::sample_patches_backward, py::arg("grad_kept"), py::arg("slot"),
        py::arg("grad_x"), py::arg("batch"), py::arg("num_tokens"), py::arg("num_kept"), py::arg("row_bytes"),
        py::arg("stream"), "grad_x[b, t] = grad_kept[b, slot[b, t]], or 0 where slot < 0; contiguous device pointers.");
  m.def("sample_patches_varlen_forward", &pss::sample_patches_varlen_forward, py::arg("x"), py::arg("scores"),
        py::arg("counts"), py::arg("tokens"), py::arg("positions"), py::arg("cu_seqlens"), py::arg("slot"),
        py::arg("workspace"), py::arg("batch"), py::arg("num_tokens"), py::arg("channels"), py::arg("num_prefix"),
        py::arg("total"), py::arg("dtype"), py::arg("scorer"), py::arg("spatial"), py::arg("stream"),
        "x (B, N, C), counts (B,) int64 -> tokens (T, C), positions (T,) int64, cu_seqlens (B + 1,) int32, "
        "slot (B, N) int32 packed rows; contiguous device pointers; as sample_patches_forward otherwise.");
  m.def("sample_patches_varlen_backward", &pss::sample_patches_varlen_backward, py::arg("grad_tokens"),
        py::arg("slot"), py::arg("grad_x"), py::arg("batch"), py::arg("num_tokens"), py::arg("row_bytes"),
        py::arg("stream"), "grad_x[b, t] = grad_tokens[slot[b, t]], or 0 where slot < 0; contiguous device pointers.");
  m.def("select_patches_varlen_host", &pss::select_patches_varlen_host, py::arg("scores"), py::arg("counts"),
        py::arg("positions"), py::arg("cu_seqlens"), py::arg("batch"), py::arg("num_patches"), py::arg("num_prefix"),
        py::arg("total"), py::arg("spatial"),
        "Host model of the packed forward's selection: scores (B, P) float32, counts (B,) int64 -> positions (T,) "
        "int64, cu_seqlens (B + 1,) int32, host pointers.");
  m.def("select_patches_host", &pss::select_patches_host, py::arg("scores"), py::arg("positions"),
        py::arg("batch"), py::arg("num_patches"), py::arg("num_kept_patches"), py::arg("spatial"),
        "Host model of the forward kernel's top-k selection (same keys and bitonic network), for CPU tests: "
        "scores (B, P) float32 -> positions (B, kept) int64, host pointers.");
}
