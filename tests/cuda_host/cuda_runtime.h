// Host emulation of the CUDA features csrc/ kernels use, so tests/test_csrc.py can run a kernel
// on a machine without a GPU: each thread of a block is a std::thread, blocks run one after
// another (so function-local `static` arrays act as the block's shared memory), __syncthreads
// is a barrier over the block, and a warp shuffle goes through a slot per thread between two
// barriers (every thread of the block must reach it together, as block_sum's callers do).
// Found first on the include path, this header stands in for the real <cuda_runtime.h>.
#pragma once

#include <math.h>

#include <algorithm>
#include <barrier>

struct mgd_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local mgd_dim3 threadIdx, blockIdx;
inline std::barrier<>* mgd_block_barrier = nullptr;  // the running block's threads
inline float mgd_shuffle_slots[1024];

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

inline void __syncthreads() { mgd_block_barrier->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  mgd_shuffle_slots[threadIdx.x] = v;
  __syncthreads();
  const float other = mgd_shuffle_slots[threadIdx.x ^ lane_mask];
  __syncthreads();
  return other;
}

inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
using std::max;
using std::min;
