// C++ entry points of the sample_patches CUDA kernels (pss_kernels/ops/sample_patches/cuda.py).
// Plain C++ (no CUDA or torch headers): bindings.cpp includes it. Pointers are device pointers
// to contiguous tensors; the stream is a cudaStream_t passed as an integer. Errors throw
// std::invalid_argument (bad arguments) or std::runtime_error (CUDA errors).
#pragma once

#include <cstdint>

namespace pss {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };
enum Scorer : int { kL1 = 0, kL2 = 1, kGiven = 2 };

// Patch tokens an image may have: the block sorts next_pow2(P) int64 keys in shared memory.
constexpr int64_t kMaxPatches = 8192;

// Bytes of device workspace that sample_patches_forward needs for this call on the current device
// (float32 scores (B, P) when the forward runs split, see sample_patches.cu; 0 when it runs fused).
int64_t sample_patches_forward_workspace_bytes(int64_t batch, int64_t num_tokens, int64_t num_prefix, int scorer);

// x (B, N, C) -> x_kept (B, k, C), index (B, k) int64, slot (B, N) int32 (row of x_kept, or -1).
// scores: (B, N - num_prefix) float32 for scorer kGiven, else unused (may be 0). workspace: at least
// sample_patches_forward_workspace_bytes() bytes (0 if that is 0), asked on the same current device.
void sample_patches_forward(std::uintptr_t x, std::uintptr_t scores, std::uintptr_t x_kept,
                            std::uintptr_t index, std::uintptr_t slot, std::uintptr_t workspace, int64_t batch,
                            int64_t num_tokens, int64_t channels, int64_t num_prefix, int64_t num_kept, int dtype,
                            int scorer, bool spatial, std::uintptr_t stream);

// grad_x[b, t] = grad_kept[b, slot[b, t]] or 0 where slot < 0; rows of row_bytes bytes.
void sample_patches_backward(std::uintptr_t grad_kept, std::uintptr_t slot, std::uintptr_t grad_x,
                             int64_t batch, int64_t num_tokens, int64_t num_kept, int64_t row_bytes,
                             std::uintptr_t stream);

// Packed (sample_patches_varlen): image b keeps counts[b] tokens (counts (B,) int64, prefix included)
// -> tokens (T, C), positions (T,) int64, cu_seqlens (B + 1,) int32, slot (B, N) int32 packed rows or -1;
// total = T = sum(counts). Counts out of [num_prefix + 1, N] are clamped into it and no row at or past
// `total` is written (the host checks them first; the kernel never trusts them). workspace as above.
void sample_patches_varlen_forward(std::uintptr_t x, std::uintptr_t scores, std::uintptr_t counts,
                                   std::uintptr_t tokens, std::uintptr_t positions, std::uintptr_t cu_seqlens,
                                   std::uintptr_t slot, std::uintptr_t workspace, int64_t batch, int64_t num_tokens,
                                   int64_t channels, int64_t num_prefix, int64_t total, int dtype, int scorer,
                                   bool spatial, std::uintptr_t stream);

// grad_x[b, t] = grad_tokens[slot[b, t]] (packed rows) or 0 where slot < 0.
void sample_patches_varlen_backward(std::uintptr_t grad_tokens, std::uintptr_t slot, std::uintptr_t grad_x,
                                    int64_t batch, int64_t num_tokens, int64_t row_bytes, std::uintptr_t stream);

// Host model of the packed selection (the kernel's clamp, keys, network and row bounds): scores (B, P)
// float32, counts (B,) int64 -> positions (T,) int64, cu_seqlens (B + 1,) int32, host pointers.
void select_patches_varlen_host(std::uintptr_t scores, std::uintptr_t counts, std::uintptr_t positions,
                                std::uintptr_t cu_seqlens, int64_t batch, int64_t num_patches, int64_t num_prefix,
                                int64_t total, bool spatial);

// Host model of the kernel's selection (same keys, same bitonic network), for CPU tests:
// scores (B, P) float32 in host memory -> positions (B, num_kept_patches) int64 in x_kept order.
void select_patches_host(std::uintptr_t scores, std::uintptr_t positions, int64_t batch,
                         int64_t num_patches, int64_t num_kept_patches, bool spatial);

}  // namespace pss
