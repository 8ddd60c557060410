// sample_patches CUDA kernels: per image, score rows in float32, select the top k, copy the kept rows.
//
// Forward, per image: score the patch rows (s = sum |x| for l1, sum x^2 for l2, in float32, or the
// given float32 scores), select the top-k by the keys of patch_topk.cuh (next_pow2(P) int64 keys
// bitonic-sorted in shared memory, 64 KiB at P = 8192), write index and slot, gather the kept rows.
// Two plans over the same device code:
//   fused (B >= number of SMs): select_kernel does it all, one block per image: one launch, x read once;
//   split (B <  number of SMs): one block per image would leave most SMs idle while it scores and
//     copies rows, so those row-parallel steps run over (row blocks, images) instead:
//       score_rows_kernel -> float32 scores (workspace) -> select_kernel with those scores and no
//       gather -> copy_rows_kernel with index as the row map.
// Backward: copy_rows_kernel with slot as the row map: grad_x[b, t] = grad_kept[b, slot[b, t]], or
// zeros where slot < 0, every row written once (no zero fill followed by a scatter).
//
// Packed (sample_patches_varlen, `counts` given): image b keeps counts[b] tokens, written from packed
// row first_row = sum(counts[:b]) (a block reduction in each select block) of positions (T,) and
// tokens (T, C); slot holds packed rows; block b writes cu_seqlens[b + 1]. The split plan's copy is
// scatter_rows_kernel (slot as the map: the image of a packed row is not at hand), the backward
// copy_rows_kernel reading the one packed tensor (source rows per image 0).
//
// Rows move as opaque copy units, the widest of 16/8/4/2 bytes that divides the row size and the
// base pointers (with_copy_unit): the fewest loads per row whatever C and the alignment are.
#include "sampling/sample_patches.h"
#include "sampling/patch_topk.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

namespace pss {
namespace {

constexpr int kWarp = 32;
constexpr int kSelectThreads = 512;
constexpr int kRowWarps = 8;  // warps (= rows) per block of the row-parallel kernels
constexpr int64_t kMaxGridY = 65535;
constexpr size_t kDefaultSharedBytes = 48 * 1024;

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <int SCORER>
__device__ __forceinline__ float score_term(float v) {
  return SCORER == kL1 ? fabsf(v) : v * v;
}

// Sum over one row of `units` copy units of T by one warp, in float32; every lane gets the total.
template <typename T, int SCORER, typename Unit>
__device__ float row_score(const Unit* __restrict__ row, int64_t units, int lane) {
  static_assert(sizeof(Unit) % sizeof(T) == 0, "a copy unit holds whole elements");
  float acc = 0.0f;
#pragma unroll 4  // several loads in flight per lane
  for (int64_t i = lane; i < units; i += kWarp) {
    const Unit packed = row[i];
    const T* values = reinterpret_cast<const T*>(&packed);
#pragma unroll
    for (int j = 0; j < static_cast<int>(sizeof(Unit) / sizeof(T)); ++j) {
      acc += score_term<SCORER>(to_float(values[j]));
    }
  }
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, offset);
  return acc;
}

template <typename Unit>
__device__ __forceinline__ void copy_row(const Unit* __restrict__ src, Unit* __restrict__ dst, int64_t units,
                                         int lane) {
#pragma unroll 4
  for (int64_t i = lane; i < units; i += kWarp) dst[i] = src[i];
}

// One block per image: keys -> top-k -> index (B, k), slot (B, N) [-> x_kept (B, k, C)].
// Scores come from the rows of x (SCORER kL1 / kL2) or from `scores` (kGiven, float32 (B, P)).
// x_kept == nullptr: no gather (the split plan copies the rows in copy_rows_kernel); x and x_kept
// are then unused, and T and Unit do not matter.
// sum(clamped counts[:image]) over the block (every thread gets it): the image's first packed row.
__device__ int64_t packed_rows_before(const int64_t* __restrict__ counts, int64_t image, int64_t num_prefix,
                                      int64_t num_tokens, uint32_t thread, uint32_t num_threads) {
  __shared__ long long warp_sums[kSelectThreads / kWarp];
  long long sum = 0;
  for (int64_t b = thread; b < image; b += num_threads) sum += clamp_count(counts[b], num_prefix, num_tokens);
#pragma unroll
  for (int offset = kWarp / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (thread % kWarp == 0) warp_sums[thread / kWarp] = sum;
  __syncthreads();
  long long total = 0;
  for (uint32_t w = 0; w < num_threads / kWarp; ++w) total += warp_sums[w];
  return total;
}

// One block per image: keys -> top-k -> index (B, k), slot (B, N) [-> x_kept (B, k, C)].
// Scores come from the rows of x (SCORER kL1 / kL2) or from `scores` (kGiven, float32 (B, P)).
// x_kept == nullptr: no gather (the split plan copies the rows in copy_rows_kernel); x and x_kept
// are then unused, and T and Unit do not matter. counts != nullptr: packed (see the top), num_kept
// unused, num_rows = T.
template <typename T, int SCORER, typename Unit>
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const Unit* __restrict__ x, const float* __restrict__ scores, Unit* __restrict__ x_kept,
                  int64_t* __restrict__ index, int32_t* __restrict__ slot, const int64_t* __restrict__ counts,
                  int32_t* __restrict__ cu_seqlens, int64_t num_tokens, int64_t units, int64_t num_prefix,
                  int64_t num_kept, int64_t num_rows, uint32_t padded, bool spatial) {
  extern __shared__ int64_t keys[];
  const int64_t image = blockIdx.x;
  const uint32_t thread = threadIdx.x, num_threads = blockDim.x;
  const uint32_t warp = thread / kWarp, num_warps = num_threads / kWarp;
  const int lane = thread % kWarp;
  int64_t first_row = image * num_kept, slot_base = 0;  // dense: the image's own rows
  if (counts != nullptr) {
    num_kept = clamp_count(counts[image], num_prefix, num_tokens);
    first_row = slot_base = packed_rows_before(counts, image, num_prefix, num_tokens, thread, num_threads);
    if (thread == 0) {
      cu_seqlens[image + 1] = static_cast<int32_t>(first_row + num_kept);
      if (image == 0) cu_seqlens[0] = 0;
    }
  }
  const bool all_kept = counts != nullptr && num_kept == num_tokens;
  const uint32_t num_patches = static_cast<uint32_t>(num_tokens - num_prefix);
  const uint32_t kept_patches = static_cast<uint32_t>(num_kept - num_prefix);
  const Unit* x_image = x + image * num_tokens * units;

  if (SCORER == kGiven || all_kept) {
    const float* image_scores = scores + image * num_patches;
    for (uint32_t p = thread; p < padded; p += num_threads) {
      keys[p] = p >= num_patches ? kPaddingKey : selection_key(all_kept ? 0.0f : image_scores[p], p, all_kept);
    }
  } else {
    for (uint32_t p = warp; p < num_patches; p += num_warps) {
      const float score = row_score<T, SCORER>(x_image + (num_prefix + p) * units, units, lane);
      if (lane == 0) keys[p] = topk_key(score, p);
    }
    for (uint32_t p = num_patches + thread; p < padded; p += num_threads) keys[p] = kPaddingKey;
  }
  sync_threads();

  int32_t* slot_image = slot + image * num_tokens;
  select_top_patches(keys, padded, num_patches, kept_patches, spatial, slot_image + num_prefix, thread,
                     num_threads);
  int64_t* index_image = index + first_row;
  for (uint32_t rank = thread; rank < kept_patches; rank += num_threads) {
    const int64_t token = num_prefix + key_position(keys[rank]);
    const int64_t row = num_prefix + rank;
    const bool fits = first_row + row < num_rows;  // always, unless a count was bad
    if (fits) index_image[row] = token;
    slot_image[token] = fits ? static_cast<int32_t>(slot_base + row) : -1;
  }
  for (int64_t token = thread; token < num_prefix; token += num_threads) {
    const bool fits = first_row + token < num_rows;
    if (fits) index_image[token] = token;
    slot_image[token] = fits ? static_cast<int32_t>(slot_base + token) : -1;
  }

  if (x_kept == nullptr) return;
  Unit* kept_image = x_kept + first_row * units;
  for (int64_t row = warp; row < num_kept && first_row + row < num_rows; row += num_warps) {
    const int64_t token = row < num_prefix ? row : num_prefix + key_position(keys[row - num_prefix]);
    copy_row(x_image + token * units, kept_image + row * units, units, lane);
  }
}

// scores[b, p] (float32 (B, P)) of patch row p of image b; grid (row blocks, images), one warp a row.
template <typename T, int SCORER, typename Unit>
__global__ void __launch_bounds__(kRowWarps * kWarp)
    score_rows_kernel(const Unit* __restrict__ x, float* __restrict__ scores, int64_t num_tokens,
                      int64_t num_prefix, int64_t units) {
  const int64_t image = blockIdx.y;
  const int64_t patch = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  const int64_t num_patches = num_tokens - num_prefix;
  if (patch >= num_patches) return;
  const int lane = threadIdx.x % kWarp;
  const float score = row_score<T, SCORER>(x + (image * num_tokens + num_prefix + patch) * units, units, lane);
  if (lane == 0) scores[image * num_patches + patch] = score;
}

// dst[b, r] = src[b, rows[b, r]], or zeros where rows[b, r] < 0; src (B, num_src_rows, units),
// dst (B, num_dst_rows, units). Forward gather: rows = index (int64); backward: rows = slot
// (int32, -1 at dropped tokens). Grid (row blocks, images), one warp a row.
template <typename Unit, typename Row>
__global__ void __launch_bounds__(kRowWarps * kWarp)
    copy_rows_kernel(const Unit* __restrict__ src, const Row* __restrict__ rows, Unit* __restrict__ dst,
                     int64_t num_src_rows, int64_t num_dst_rows, int64_t units) {
  const int64_t image = blockIdx.y;
  const int64_t dst_row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (dst_row >= num_dst_rows) return;
  const int lane = threadIdx.x % kWarp;
  const int64_t src_row = rows[image * num_dst_rows + dst_row];
  Unit* out = dst + (image * num_dst_rows + dst_row) * units;
  if (src_row >= 0) {
    copy_row(src + (image * num_src_rows + src_row) * units, out, units, lane);
  } else {
    for (int64_t i = lane; i < units; i += kWarp) out[i] = Unit{};
  }
}

// dst[slot[b, r]] = src[b, r] where slot[b, r] >= 0: the packed split plan's copy; grid (row blocks,
// images), one warp a row. Dropped rows are not read.
template <typename Unit>
__global__ void __launch_bounds__(kRowWarps * kWarp)
    scatter_rows_kernel(const Unit* __restrict__ src, const int32_t* __restrict__ slot, Unit* __restrict__ dst,
                        int64_t num_src_rows, int64_t units) {
  const int64_t image = blockIdx.y;
  const int64_t src_row = static_cast<int64_t>(blockIdx.x) * kRowWarps + threadIdx.x / kWarp;
  if (src_row >= num_src_rows) return;
  const int32_t dst_row = slot[image * num_src_rows + src_row];
  if (dst_row < 0) return;
  copy_row(src + (image * num_src_rows + src_row) * units, dst + static_cast<int64_t>(dst_row) * units, units,
           threadIdx.x % kWarp);
}

void check_cuda(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": CUDA error: " + cudaGetErrorString(err));
}

void check_shape(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

uint32_t next_pow2(int64_t n) {
  uint32_t p = 1;
  while (p < n) p <<= 1;
  return p;
}

// Calls f(Unit{}) with the widest copy unit that divides `alignment` (the row size in bytes OR'ed
// with the base pointers of every row array), of at least kMinBytes bytes (the element size: a unit
// holds whole elements; the caller has checked that alignment is a multiple of it).
template <int kMinBytes, typename F>
void with_copy_unit(std::uintptr_t alignment, F&& f) {
  static_assert(kMinBytes == 2 || kMinBytes == 4, "elements of 2 or 4 bytes");
  if (alignment % 16 == 0) return f(uint4{});
  if (alignment % 8 == 0) return f(uint2{});
  if constexpr (kMinBytes == 2) {
    if (alignment % 4 == 0) return f(uint32_t{});
    return f(uint16_t{});
  } else {
    return f(uint32_t{});
  }
}

template <typename Unit, typename Row>
void launch_copy_rows(std::uintptr_t src, std::uintptr_t rows, std::uintptr_t dst, int64_t batch,
                      int64_t num_src_rows, int64_t num_dst_rows, int64_t row_bytes, cudaStream_t stream,
                      const char* what) {
  const dim3 grid(static_cast<unsigned>((num_dst_rows + kRowWarps - 1) / kRowWarps), static_cast<unsigned>(batch));
  copy_rows_kernel<Unit, Row><<<grid, kRowWarps * kWarp, 0, stream>>>(
      reinterpret_cast<const Unit*>(src), reinterpret_cast<const Row*>(rows), reinterpret_cast<Unit*>(dst),
      num_src_rows, num_dst_rows, row_bytes / static_cast<int64_t>(sizeof(Unit)));
  check_cuda(cudaGetLastError(), what);
}

// The forward's plan: split when one block per image leaves SMs idle. The current device is x's
// (the Python wrapper sets it), so its SM count is the one that matters.
bool forward_splits(int64_t batch) {
  int device = 0, num_sms = 0;
  check_cuda(cudaGetDevice(&device), "sample_patches_forward (cudaGetDevice)");
  check_cuda(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, device),
             "sample_patches_forward (multiprocessor count)");
  return batch < num_sms;
}

template <typename T, typename Unit>
int64_t units_per_row(int64_t channels) {
  return channels * static_cast<int64_t>(sizeof(T)) / static_cast<int64_t>(sizeof(Unit));
}

struct ForwardArgs {
  std::uintptr_t x, scores, x_kept, index, slot, workspace;
  int64_t batch, num_tokens, channels, num_prefix, num_kept;
  bool spatial;
  cudaStream_t stream;
  std::uintptr_t counts = 0, cu_seqlens = 0;  // packed: counts (B,) int64, cu_seqlens (B + 1,) int32
  int64_t num_rows = 0;                        // rows of index / x_kept: B k, or T when packed
};

template <typename T, int SCORER, typename Unit>
void launch_select(const ForwardArgs& a, std::uintptr_t x, std::uintptr_t scores, std::uintptr_t x_kept) {
  const uint32_t padded = next_pow2(a.num_tokens - a.num_prefix);
  const size_t shared_bytes = padded * sizeof(int64_t);
  auto kernel = select_kernel<T, SCORER, Unit>;
  if (shared_bytes > kDefaultSharedBytes) {
    check_cuda(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                    static_cast<int>(shared_bytes)),
               "sample_patches_forward (shared memory opt-in)");
  }
  kernel<<<static_cast<unsigned>(a.batch), kSelectThreads, shared_bytes, a.stream>>>(
      reinterpret_cast<const Unit*>(x), reinterpret_cast<const float*>(scores), reinterpret_cast<Unit*>(x_kept),
      reinterpret_cast<int64_t*>(a.index), reinterpret_cast<int32_t*>(a.slot),
      reinterpret_cast<const int64_t*>(a.counts), reinterpret_cast<int32_t*>(a.cu_seqlens), a.num_tokens,
      units_per_row<T, Unit>(a.channels), a.num_prefix, a.num_kept, a.num_rows, padded, a.spatial);
  check_cuda(cudaGetLastError(), "sample_patches_forward (select)");
}

template <typename T, int SCORER, typename Unit>
void launch_forward(const ForwardArgs& a) {
  if (!forward_splits(a.batch)) return launch_select<T, SCORER, Unit>(a, a.x, a.scores, a.x_kept);
  std::uintptr_t scores = a.scores;
  if constexpr (SCORER != kGiven) {
    const int64_t num_patches = a.num_tokens - a.num_prefix;
    const dim3 grid(static_cast<unsigned>((num_patches + kRowWarps - 1) / kRowWarps), static_cast<unsigned>(a.batch));
    score_rows_kernel<T, SCORER, Unit><<<grid, kRowWarps * kWarp, 0, a.stream>>>(
        reinterpret_cast<const Unit*>(a.x), reinterpret_cast<float*>(a.workspace), a.num_tokens, a.num_prefix,
        units_per_row<T, Unit>(a.channels));
    check_cuda(cudaGetLastError(), "sample_patches_forward (score)");
    scores = a.workspace;
  }
  launch_select<T, kGiven, Unit>(a, 0, scores, 0);
  if (a.counts != 0) {
    const dim3 grid(static_cast<unsigned>((a.num_tokens + kRowWarps - 1) / kRowWarps), static_cast<unsigned>(a.batch));
    scatter_rows_kernel<Unit><<<grid, kRowWarps * kWarp, 0, a.stream>>>(
        reinterpret_cast<const Unit*>(a.x), reinterpret_cast<const int32_t*>(a.slot), reinterpret_cast<Unit*>(a.x_kept),
        a.num_tokens, units_per_row<T, Unit>(a.channels));
    check_cuda(cudaGetLastError(), "sample_patches_varlen_forward (scatter)");
    return;
  }
  launch_copy_rows<Unit, int64_t>(a.x, a.index, a.x_kept, a.batch, a.num_tokens, a.num_kept,
                                  a.channels * static_cast<int64_t>(sizeof(T)), a.stream,
                                  "sample_patches_forward (gather)");
}

template <typename T, int SCORER>
void dispatch_unit(const ForwardArgs& a) {
  const std::uintptr_t alignment = a.x | a.x_kept | static_cast<std::uintptr_t>(a.channels * sizeof(T));
  check_shape(alignment % sizeof(T) == 0, "sample_patches_forward: x and x_kept must be aligned to their elements");
  with_copy_unit<sizeof(T)>(alignment, [&](auto unit) { launch_forward<T, SCORER, decltype(unit)>(a); });
}

template <typename T>
void dispatch_scorer(const ForwardArgs& a, int scorer) {
  switch (scorer) {
    case kL1: return dispatch_unit<T, kL1>(a);
    case kL2: return dispatch_unit<T, kL2>(a);
    case kGiven: return dispatch_unit<T, kGiven>(a);
    default: throw std::invalid_argument("sample_patches_forward: unknown scorer id " + std::to_string(scorer));
  }
}

void dispatch_dtype(const ForwardArgs& args, int dtype, int scorer) {
  switch (dtype) {
    case kFloat32: return dispatch_scorer<float>(args, scorer);
    case kFloat16: return dispatch_scorer<__half>(args, scorer);
    case kBFloat16: return dispatch_scorer<__nv_bfloat16>(args, scorer);
    default: throw std::invalid_argument("sample_patches_forward: unknown dtype id " + std::to_string(dtype));
  }
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

int64_t sample_patches_forward_workspace_bytes(int64_t batch, int64_t num_tokens, int64_t num_prefix, int scorer) {
  if (batch <= 0 || scorer == kGiven || !forward_splits(batch)) return 0;
  return batch * (num_tokens - num_prefix) * static_cast<int64_t>(sizeof(float));
}

void sample_patches_forward(std::uintptr_t x, std::uintptr_t scores, std::uintptr_t x_kept, std::uintptr_t index,
                            std::uintptr_t slot, std::uintptr_t workspace, int64_t batch, int64_t num_tokens,
                            int64_t channels, int64_t num_prefix, int64_t num_kept, int dtype, int scorer,
                            bool spatial, std::uintptr_t stream) {
  check_selection(num_tokens - num_prefix, num_kept - num_prefix, "sample_patches_forward");
  check_shape(batch >= 0 && channels >= 1 && num_prefix >= 0, "sample_patches_forward: bad shape");
  if (batch == 0) return;
  check_shape(workspace != 0 || sample_patches_forward_workspace_bytes(batch, num_tokens, num_prefix, scorer) == 0,
              "sample_patches_forward: this batch needs a workspace of sample_patches_forward_workspace_bytes()");
  ForwardArgs args{x, scores, x_kept, index, slot, workspace, batch, num_tokens, channels,
                   num_prefix, num_kept, spatial, reinterpret_cast<cudaStream_t>(stream)};
  args.num_rows = batch * num_kept;
  dispatch_dtype(args, dtype, scorer);
}

void sample_patches_varlen_forward(std::uintptr_t x, std::uintptr_t scores, std::uintptr_t counts,
                                   std::uintptr_t tokens, std::uintptr_t positions, std::uintptr_t cu_seqlens,
                                   std::uintptr_t slot, std::uintptr_t workspace, int64_t batch, int64_t num_tokens,
                                   int64_t channels, int64_t num_prefix, int64_t total, int dtype, int scorer,
                                   bool spatial, std::uintptr_t stream) {
  check_selection(num_tokens - num_prefix, 1, "sample_patches_varlen_forward");
  check_shape(batch >= 1 && channels >= 1 && num_prefix >= 0 && total >= 0,
              "sample_patches_varlen_forward: bad shape");
  check_shape(counts != 0 && cu_seqlens != 0, "sample_patches_varlen_forward: counts and cu_seqlens are required");
  check_shape(workspace != 0 || sample_patches_forward_workspace_bytes(batch, num_tokens, num_prefix, scorer) == 0,
              "sample_patches_varlen_forward: this batch needs a workspace of "
              "sample_patches_forward_workspace_bytes()");
  ForwardArgs args{x, scores, tokens, positions, slot, workspace, batch, num_tokens, channels,
                   num_prefix, 0, spatial, reinterpret_cast<cudaStream_t>(stream)};
  args.counts = counts;
  args.cu_seqlens = cu_seqlens;
  args.num_rows = total;
  dispatch_dtype(args, dtype, scorer);
}

void sample_patches_varlen_backward(std::uintptr_t grad_tokens, std::uintptr_t slot, std::uintptr_t grad_x,
                                    int64_t batch, int64_t num_tokens, int64_t row_bytes, std::uintptr_t stream) {
  // copy_rows_kernel with 0 source rows per image: every image reads the one packed tensor.
  sample_patches_backward(grad_tokens, slot, grad_x, batch, num_tokens, 0, row_bytes, stream);
}

void sample_patches_backward(std::uintptr_t grad_kept, std::uintptr_t slot, std::uintptr_t grad_x, int64_t batch,
                             int64_t num_tokens, int64_t num_kept, int64_t row_bytes, std::uintptr_t stream) {
  check_shape(batch <= kMaxGridY, "sample_patches_backward: batch must be <= " + std::to_string(kMaxGridY) +
                                      ", got " + std::to_string(batch));
  check_shape(row_bytes >= 2 && row_bytes % 2 == 0, "sample_patches_backward: bad row size");
  if (batch == 0 || num_tokens == 0) return;
  const std::uintptr_t alignment = grad_kept | grad_x | static_cast<std::uintptr_t>(row_bytes);
  check_shape(alignment % 2 == 0, "sample_patches_backward: grad_kept and grad_x must be 2-byte aligned");
  with_copy_unit<2>(alignment, [&](auto unit) {
    launch_copy_rows<decltype(unit), int32_t>(grad_kept, slot, grad_x, batch, num_kept, num_tokens, row_bytes,
                                              reinterpret_cast<cudaStream_t>(stream), "sample_patches_backward");
  });
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

void select_patches_varlen_host(std::uintptr_t scores, std::uintptr_t counts, std::uintptr_t positions,
                                std::uintptr_t cu_seqlens, int64_t batch, int64_t num_patches, int64_t num_prefix,
                                int64_t total, bool spatial) {
  check_selection(num_patches, 1, "select_patches_varlen_host");
  const int64_t num_tokens = num_prefix + num_patches;
  const uint32_t padded = next_pow2(num_patches);
  std::vector<int64_t> keys(padded);
  const float* all_scores = reinterpret_cast<const float*>(scores);
  const int64_t* all_counts = reinterpret_cast<const int64_t*>(counts);
  int64_t* all_positions = reinterpret_cast<int64_t*>(positions);
  int32_t* offsets = reinterpret_cast<int32_t*>(cu_seqlens);
  int64_t first_row = 0;
  offsets[0] = 0;
  for (int64_t image = 0; image < batch; ++image) {
    const int64_t num_kept = clamp_count(all_counts[image], num_prefix, num_tokens);
    const bool all_kept = num_kept == num_tokens;
    for (uint32_t p = 0; p < padded; ++p) {
      keys[p] = p < num_patches ? selection_key(all_scores[image * num_patches + p], p, all_kept) : kPaddingKey;
    }
    select_top_patches(keys.data(), padded, static_cast<uint32_t>(num_patches),
                       static_cast<uint32_t>(num_kept - num_prefix), spatial, nullptr, 0, 1);
    for (int64_t row = 0; row < num_kept && first_row + row < total; ++row) {
      all_positions[first_row + row] = row < num_prefix ? row : num_prefix + key_position(keys[row - num_prefix]);
    }
    first_row += num_kept;
    offsets[image + 1] = static_cast<int32_t>(first_row);
  }
}

}  // namespace pss
