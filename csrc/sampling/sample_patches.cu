// sample_patches CUDA kernels (DESIGN §1, §4).
//
// Forward: one block per image.
//   1. score: one warp per patch row, 16-byte vector loads when rows are 16-byte aligned,
//      s = sum |x| (l1) or sum x^2 (l2) in float32 (or the given float32 scores);
//   2. select: keys (patch_topk.cuh) of all patches, bitonic-sorted in shared memory
//      (next_pow2(P) int64 keys, 64 KiB at P = 8192), which yields index and slot;
//   3. gather: one warp per kept row, copied with 16-byte vectors.
// Backward: one warp per token row of grad_x: the grad_kept row at slot[b, t], or zeros.
#include "sampling/sample_patches.h"
#include "sampling/patch_topk.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

namespace pss {
namespace {

constexpr int kWarp = 32;
constexpr int kSelectThreads = 512;
constexpr int kBackwardWarps = 8;
constexpr int64_t kMaxGridY = 65535;
constexpr size_t kDefaultSharedBytes = 48 * 1024;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <int SCORER>
__device__ __forceinline__ float score_term(float v) {
  return SCORER == kL1 ? fabsf(v) : v * v;
}

// sum over one row of `channels` elements by one warp; every lane gets the total.
template <typename T, int SCORER, bool VEC16>
__device__ float row_score(const T* __restrict__ row, int64_t channels, int lane) {
  float acc = 0.0f;
  if constexpr (VEC16) {
    constexpr int kPerVector = 16 / sizeof(T);
    const uint4* vectors = reinterpret_cast<const uint4*>(row);
#pragma unroll 4  // several 16-byte loads in flight per lane
    for (int64_t i = lane; i < channels / kPerVector; i += kWarp) {
      const uint4 packed = vectors[i];
      const T* values = reinterpret_cast<const T*>(&packed);
#pragma unroll
      for (int j = 0; j < kPerVector; ++j) acc += score_term<SCORER>(to_float(values[j]));
    }
  } else {
    for (int64_t i = lane; i < channels; i += kWarp) acc += score_term<SCORER>(to_float(row[i]));
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  return acc;
}

// Rows are moved as opaque units: 16-byte vectors when aligned, else one element.
template <typename T, bool VEC16>
using CopyUnit = std::conditional_t<VEC16, uint4, std::conditional_t<sizeof(T) == 4, uint32_t, uint16_t>>;

template <typename Unit>
__device__ __forceinline__ void copy_row(const Unit* __restrict__ src, Unit* __restrict__ dst, int64_t units,
                                         int lane) {
#pragma unroll 4
  for (int64_t i = lane; i < units; i += kWarp) dst[i] = src[i];
}

template <typename T, int SCORER, bool VEC16>
__global__ void __launch_bounds__(kSelectThreads)
    sample_patches_forward_kernel(const T* __restrict__ x, const float* __restrict__ scores, T* __restrict__ x_kept,
                                  int64_t* __restrict__ index, int32_t* __restrict__ slot, int64_t num_tokens,
                                  int64_t channels, int64_t num_prefix, int64_t num_kept, uint32_t padded,
                                  bool spatial) {
  extern __shared__ int64_t keys[];
  const int64_t image = blockIdx.x;
  const uint32_t thread = threadIdx.x, num_threads = blockDim.x;
  const uint32_t warp = thread / kWarp, num_warps = num_threads / kWarp;
  const int lane = thread % kWarp;
  const uint32_t num_patches = static_cast<uint32_t>(num_tokens - num_prefix);
  const uint32_t kept_patches = static_cast<uint32_t>(num_kept - num_prefix);
  const T* x_image = x + image * num_tokens * channels;

  if constexpr (SCORER == kGiven) {
    const float* image_scores = scores + image * num_patches;
    for (uint32_t p = thread; p < padded; p += num_threads) {
      keys[p] = p < num_patches ? topk_key(image_scores[p], p) : kPaddingKey;
    }
  } else {
    for (uint32_t p = warp; p < num_patches; p += num_warps) {
      const float score = row_score<T, SCORER, VEC16>(x_image + (num_prefix + p) * channels, channels, lane);
      if (lane == 0) keys[p] = topk_key(score, p);
    }
    for (uint32_t p = num_patches + thread; p < padded; p += num_threads) keys[p] = kPaddingKey;
  }
  sync_threads();

  int32_t* slot_image = slot + image * num_tokens;
  select_top_patches(keys, padded, num_patches, kept_patches, spatial, slot_image + num_prefix, thread,
                     num_threads);
  int64_t* index_image = index + image * num_kept;
  for (uint32_t rank = thread; rank < kept_patches; rank += num_threads) {
    const int64_t token = num_prefix + key_position(keys[rank]);
    index_image[num_prefix + rank] = token;
    slot_image[token] = static_cast<int32_t>(num_prefix + rank);
  }
  for (int64_t token = thread; token < num_prefix; token += num_threads) {
    index_image[token] = token;
    slot_image[token] = static_cast<int32_t>(token);
  }

  using Unit = CopyUnit<T, VEC16>;
  const int64_t units = channels * static_cast<int64_t>(sizeof(T)) / static_cast<int64_t>(sizeof(Unit));
  const Unit* x_units = reinterpret_cast<const Unit*>(x_image);
  Unit* kept_units = reinterpret_cast<Unit*>(x_kept + image * num_kept * channels);
  for (int64_t row = warp; row < num_kept; row += num_warps) {
    const int64_t token = row < num_prefix ? row : num_prefix + key_position(keys[row - num_prefix]);
    copy_row(x_units + token * units, kept_units + row * units, units, lane);
  }
}

template <typename Unit>
__global__ void __launch_bounds__(kBackwardWarps * kWarp)
    sample_patches_backward_kernel(const Unit* __restrict__ grad_kept, const int32_t* __restrict__ slot,
                                   Unit* __restrict__ grad_x, int64_t num_tokens, int64_t num_kept, int64_t units) {
  const int64_t image = blockIdx.y;
  const int64_t token = static_cast<int64_t>(blockIdx.x) * kBackwardWarps + threadIdx.x / kWarp;
  if (token >= num_tokens) return;
  const int lane = threadIdx.x % kWarp;
  const int32_t row = slot[image * num_tokens + token];
  Unit* dst = grad_x + (image * num_tokens + token) * units;
  if (row >= 0) {
    copy_row(grad_kept + (image * num_kept + row) * units, dst, units, lane);
  } else {
    for (int64_t i = lane; i < units; i += kWarp) dst[i] = Unit{};
  }
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA error: " + cudaGetErrorString(err));
}

uint32_t next_pow2(int64_t n) {
  uint32_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

void check_shape(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

struct ForwardArgs {
  std::uintptr_t x, scores, x_kept, index, slot;
  int64_t batch, num_tokens, channels, num_prefix, num_kept;
  bool spatial;
  cudaStream_t stream;
};

template <typename T, int SCORER, bool VEC16>
void launch_forward(const ForwardArgs& a) {
  const uint32_t padded = next_pow2(a.num_tokens - a.num_prefix);
  const size_t shared_bytes = padded * sizeof(int64_t);
  auto kernel = sample_patches_forward_kernel<T, SCORER, VEC16>;
  if (shared_bytes > kDefaultSharedBytes) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(shared_bytes)),
               "sample_patches_forward (shared memory opt-in)");
  }
  kernel<<<static_cast<unsigned>(a.batch), kSelectThreads, shared_bytes, a.stream>>>(
      reinterpret_cast<const T*>(a.x), reinterpret_cast<const float*>(a.scores), reinterpret_cast<T*>(a.x_kept),
      reinterpret_cast<int64_t*>(a.index), reinterpret_cast<int32_t*>(a.slot), a.num_tokens, a.channels,
      a.num_prefix, a.num_kept, padded, a.spatial);
  check_cuda(cudaGetLastError(), "sample_patches_forward");
}

template <typename T, int SCORER>
void dispatch_vector(const ForwardArgs& a) {
  // 16-byte vectors need 16-byte aligned rows in x and x_kept.
  const bool vec16 = (a.channels * sizeof(T)) % 16 == 0 && a.x % 16 == 0 && a.x_kept % 16 == 0;
  vec16 ? launch_forward<T, SCORER, true>(a) : launch_forward<T, SCORER, false>(a);
}

template <typename T>
void dispatch_scorer(const ForwardArgs& a, int scorer) {
  switch (scorer) {
    case kL1: return dispatch_vector<T, kL1>(a);
    case kL2: return dispatch_vector<T, kL2>(a);
    case kGiven: return dispatch_vector<T, kGiven>(a);
    default: throw std::invalid_argument("sample_patches_forward: unknown scorer id " + std::to_string(scorer));
  }
}

template <typename Unit>
void launch_backward(std::uintptr_t grad_kept, std::uintptr_t slot, std::uintptr_t grad_x, int64_t batch,
                     int64_t num_tokens, int64_t num_kept, int64_t row_bytes, cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((num_tokens + kBackwardWarps - 1) / kBackwardWarps),
                  static_cast<unsigned>(batch));
  sample_patches_backward_kernel<Unit><<<grid, kBackwardWarps * kWarp, 0, stream>>>(
      reinterpret_cast<const Unit*>(grad_kept), reinterpret_cast<const int32_t*>(slot),
      reinterpret_cast<Unit*>(grad_x), num_tokens, num_kept, row_bytes / static_cast<int64_t>(sizeof(Unit)));
  check_cuda(cudaGetLastError(), "sample_patches_backward");
}

void check_selection(int64_t num_patches, int64_t num_kept_patches, const char* what) {
  check_shape(num_patches >= 1 && num_patches <= kMaxPatches,
              std::string(what) + ": the number of patch tokens must be in [1, " + std::to_string(kMaxPatches) +
                  "], got " + std::to_string(num_patches));
  check_shape(num_kept_patches >= 1 && num_kept_patches <= num_patches,
              std::string(what) + ": kept patches must be in [1, " + std::to_string(num_patches) + "], got " +
                  std::to_string(num_kept_patches));
}

}  // namespace

void sample_patches_forward(std::uintptr_t x, std::uintptr_t scores, std::uintptr_t x_kept, std::uintptr_t index,
                            std::uintptr_t slot, int64_t batch, int64_t num_tokens, int64_t channels,
                            int64_t num_prefix, int64_t num_kept, int dtype, int scorer, bool spatial,
                            std::uintptr_t stream) {
  check_selection(num_tokens - num_prefix, num_kept - num_prefix, "sample_patches_forward");
  check_shape(batch >= 0 && channels >= 1 && num_prefix >= 0, "sample_patches_forward: bad shape");
  if (batch == 0) return;
  const ForwardArgs args{x,         scores,   x_kept,  index,
                         slot,      batch,    num_tokens, channels,
                         num_prefix, num_kept, spatial, reinterpret_cast<cudaStream_t>(stream)};
  switch (dtype) {
    case kFloat32: return dispatch_scorer<float>(args, scorer);
    case kFloat16: return dispatch_scorer<__half>(args, scorer);
    case kBFloat16: return dispatch_scorer<__nv_bfloat16>(args, scorer);
    default: throw std::invalid_argument("sample_patches_forward: unknown dtype id " + std::to_string(dtype));
  }
}

void sample_patches_backward(std::uintptr_t grad_kept, std::uintptr_t slot, std::uintptr_t grad_x, int64_t batch,
                             int64_t num_tokens, int64_t num_kept, int64_t row_bytes, std::uintptr_t stream) {
  check_shape(batch <= kMaxGridY, "sample_patches_backward: batch must be <= " + std::to_string(kMaxGridY) +
                                      ", got " + std::to_string(batch));
  check_shape(row_bytes >= 2 && row_bytes % 2 == 0, "sample_patches_backward: bad row size");
  if (batch == 0 || num_tokens == 0) return;
  const auto cuda_stream = reinterpret_cast<cudaStream_t>(stream);
  // The widest unit that divides the row and the alignment of both row arrays.
  const std::uintptr_t alignment = grad_kept | grad_x | static_cast<std::uintptr_t>(row_bytes);
  if (alignment % 16 == 0) return launch_backward<uint4>(grad_kept, slot, grad_x, batch, num_tokens, num_kept, row_bytes, cuda_stream);
  if (alignment % 8 == 0) return launch_backward<uint2>(grad_kept, slot, grad_x, batch, num_tokens, num_kept, row_bytes, cuda_stream);
  if (alignment % 4 == 0) return launch_backward<uint32_t>(grad_kept, slot, grad_x, batch, num_tokens, num_kept, row_bytes, cuda_stream);
  launch_backward<uint16_t>(grad_kept, slot, grad_x, batch, num_tokens, num_kept, row_bytes, cuda_stream);
}

void select_patches_host(std::uintptr_t scores, std::uintptr_t positions, int64_t batch, int64_t num_patches,
                         int64_t num_kept_patches, bool spatial) {
  check_selection(num_patches, num_kept_patches, "select_patches_host");
  const uint32_t padded = next_pow2(num_patches);
  std::vector<int64_t> keys(padded);
  const float* all_scores = reinterpret_cast<const float*>(scores);
  int64_t* all_positions = reinterpret_cast<int64_t*>(positions);
  for (int64_t image = 0; image < batch; ++image) {
    for (uint32_t p = 0; p < padded; ++p) {
      keys[p] = p < num_patches ? topk_key(all_scores[image * num_patches + p], p) : kPaddingKey;
    }
    select_top_patches(keys.data(), padded, static_cast<uint32_t>(num_patches),
                       static_cast<uint32_t>(num_kept_patches), spatial, nullptr, 0, 1);
    for (int64_t rank = 0; rank < num_kept_patches; ++rank) {
      all_positions[image * num_kept_patches + rank] = key_position(keys[rank]);
    }
  }
}

}  // namespace pss
