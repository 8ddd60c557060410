// Top-k selection of patch tokens, shared by the device kernel and its host model (P <= 8192).
//
// Each patch p of an image gets an int64 key
//     key(s, p) = ordered(s) * 2^32 + (2^32 - 1 - p)
// so that descending keys = descending score, ties to the lower position (sample_patches' order="score").
// ordered() is the order-preserving float -> int32 map (flip the magnitude bits of negative
// floats), with -0.0 folded onto +0.0 and every NaN ranked above +inf, as torch.sort orders
// them. It works on the bits, so flush-to-zero float comparisons could not change it.
// Padding keys (lanes past the last patch) are kPaddingKey, below every real key.
// The Triton backend uses the same key (pss_kernels/ops/sample_patches/triton_sample.py).
//
// The bitonic network is written once for both sides: a step's compare-swaps touch disjoint
// pairs, so `num_threads` threads of a block (device) or one thread (host, num_threads = 1)
// produce the same result; sync_threads() is the block barrier on the device, a no-op on the host.
#pragma once

#include <cstdint>

#ifdef __CUDACC__
#define PSS_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define PSS_HOST_DEVICE inline
#endif

namespace pss {

constexpr int64_t kPaddingKey = INT64_MIN;

PSS_HOST_DEVICE void sync_threads() {
#ifdef __CUDA_ARCH__
  __syncthreads();
#endif
}

PSS_HOST_DEVICE int32_t float_bits(float value) {
#ifdef __CUDA_ARCH__
  return __float_as_int(value);
#else
  union { float f; int32_t i; } pun{value};
  return pun.i;
#endif
}

PSS_HOST_DEVICE int32_t ordered_score(float score) {
  int32_t bits = float_bits(score);
  if ((bits & 0x7FFFFFFF) > 0x7F800000) return INT32_MAX;  // NaN ranks first
  if (bits == INT32_MIN) bits = 0;                           // -0.0 ties with +0.0
  return bits ^ ((bits >> 31) & 0x7FFFFFFF);
}

PSS_HOST_DEVICE int64_t topk_key(float score, uint32_t position) {
  const uint64_t high = static_cast<uint64_t>(static_cast<uint32_t>(ordered_score(score))) << 32;
  return static_cast<int64_t>(high | (0xFFFFFFFFull - position));
}

PSS_HOST_DEVICE uint32_t key_position(int64_t key) {
  return 0xFFFFFFFFu - static_cast<uint32_t>(static_cast<uint64_t>(key) & 0xFFFFFFFFull);
}

// Packed selection (sample_patches_varlen): image b keeps counts[b] tokens, prefix included. A count
// out of [num_prefix + 1, N] (refused on the host, but a kernel never trusts it) is clamped into it,
// and rows at or past the allocated total are not written: wrong values, never out of bounds.
PSS_HOST_DEVICE int64_t clamp_count(int64_t count, int64_t num_prefix, int64_t num_tokens) {
  return count < num_prefix + 1 ? num_prefix + 1 : (count > num_tokens ? num_tokens : count);
}

// An image that keeps every patch keeps them in position order (sample_patches at keep_rate 1):
// equal scores, ties to the lower position.
PSS_HOST_DEVICE int64_t selection_key(float score, uint32_t position, bool all_kept) {
  return topk_key(all_kept ? 0.0f : score, position);
}

// Sorts keys[0, n) descending in place; n is a power of two.
PSS_HOST_DEVICE void bitonic_sort_descending(int64_t* keys, uint32_t n, uint32_t thread, uint32_t num_threads) {
  for (uint32_t size = 2; size <= n; size <<= 1) {
    for (uint32_t stride = size >> 1; stride > 0; stride >>= 1) {
      for (uint32_t pair = thread; pair < n / 2; pair += num_threads) {
        const uint32_t lo = 2 * stride * (pair / stride) + pair % stride;
        const uint32_t hi = lo + stride;
        const bool descending = (lo & size) == 0;  // blocks of `size` alternate; the last is descending
        const int64_t a = keys[lo], b = keys[hi];
        if ((a < b) == descending && a != b) {
          keys[lo] = b;
          keys[hi] = a;
        }
      }
      sync_threads();
    }
  }
}

// keys[0, padded): the keys of `num_patches` patches then padding, padded a power of two.
// Leaves keys[0, num_kept) = the kept patches in x_kept order: by descending score, or, with
// `spatial`, by ascending position (the kept patches get equal scores and are sorted again).
// dropped_slots (nullable; the slot row of the image's patches) gets -1 at every dropped patch.
PSS_HOST_DEVICE void select_top_patches(int64_t* keys, uint32_t padded, uint32_t num_patches, uint32_t num_kept,
                                        bool spatial, int32_t* dropped_slots, uint32_t thread,
                                        uint32_t num_threads) {
  bitonic_sort_descending(keys, padded, thread, num_threads);
  if (dropped_slots != nullptr) {
    for (uint32_t rank = num_kept + thread; rank < num_patches; rank += num_threads) {
      dropped_slots[key_position(keys[rank])] = -1;
    }
  }
  if (!spatial) return;
  sync_threads();  // the loop above reads keys that the re-keying overwrites
  for (uint32_t rank = thread; rank < padded; rank += num_threads) {
    keys[rank] = rank < num_kept ? topk_key(0.0f, key_position(keys[rank])) : kPaddingKey;
  }
  sync_threads();
  bitonic_sort_descending(keys, padded, thread, num_threads);
}

}  // namespace pss
