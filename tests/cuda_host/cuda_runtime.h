// Host emulation of the CUDA features csrc/ kernels use, so tests/test_csrc.py can run a kernel
// on a machine without a GPU: each thread of a block is a std::thread, blocks run one after
// another (so function-local `static` arrays act as the block's shared memory), __syncthreads
// is a barrier over the block, and a warp shuffle goes through a slot per thread between two
// barriers over its warp's 32 threads only: as on a GPU, a shuffle orders nothing between warps,
// so a __syncthreads missing between two warps' shared-memory accesses is not hidden by it.
//
// Two ways to run the threads (mgd_order, set by the harness):
//  0   free: the OS schedules them (what a race does then depends on timing);
//  +1  ordered, lowest id first / -1 highest id first: one thread runs at a time, each until its
//      next barrier (block or warp), then the next runnable one in that order. Between two
//      barriers every thread then runs alone and whole, before or after every other: a write and a
//      read of the same shared word by two threads between the same two barriers (a race) give
//      other results in the two orders, every time. A barrier some thread never reaches (a
//      divergent __syncthreads) stops the run with exit status 3 at once instead of hanging.
// Found first on the include path, this header stands in for the real <cuda_runtime.h>.
#pragma once

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

#include <algorithm>
#include <barrier>
#include <memory>
#include <mutex>
#include <semaphore>
#include <vector>

struct mgd_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
inline thread_local mgd_dim3 threadIdx, blockIdx;
inline float mgd_shuffle_slots[1024];
inline int mgd_order = 0;  // 0 free, +1 / -1 ordered (see above)

// free: std::barrier over the block and one per warp
inline std::barrier<>* mgd_block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> mgd_warp_barriers;

// ordered: a token passed from thread to thread; state -1 runnable, -2 finished, g >= 0 waiting on
// group g (0: the block, 1 + w: warp w)
struct MgdSched {
  std::mutex m;
  int n = 0;
  std::vector<int> state, arrived;
  std::vector<std::unique_ptr<std::binary_semaphore>> go;

  void reset(int threads) {
    n = threads;
    state.assign(n, -1);
    arrived.assign(1 + (n + 31) / 32, 0);
    go.clear();
    for (int t = 0; t < n; ++t) go.push_back(std::make_unique<std::binary_semaphore>(0));
  }
  int first_runnable() const {
    for (int k = 0; k < n; ++k) {
      const int t = mgd_order > 0 ? k : n - 1 - k;
      if (state[t] == -1) return t;
    }
    return -1;
  }
  void pass_token_locked() {  // m held: the next runnable thread runs
    const int t = first_runnable();
    if (t >= 0) {
      go[t]->release();
      return;
    }
    for (int s : state)
      if (s != -2) {
        fprintf(stderr, "cuda emulation: deadlock: no thread can run (a barrier that not every thread reaches)\n");
        fflush(stderr);
        _Exit(3);
      }
  }
  void sync(int g, int size) {  // a barrier over group g of `size` threads
    const int me = threadIdx.x;
    {
      std::lock_guard<std::mutex> lk(m);
      state[me] = g;
      if (++arrived[g] == size) {
        arrived[g] = 0;
        for (int t = 0; t < n; ++t)
          if (state[t] == g) state[t] = -1;
      }
      pass_token_locked();
    }
    go[me]->acquire();
  }
  void start() { go[threadIdx.x]->acquire(); }  // a thread's first run waits for the token
  void finish() {
    std::lock_guard<std::mutex> lk(m);
    state[threadIdx.x] = -2;
    pass_token_locked();
  }
};
inline MgdSched mgd_sched;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

inline void __syncthreads() {
  if (mgd_order == 0) mgd_block_barrier->arrive_and_wait();
  else mgd_sched.sync(0, mgd_sched.n);
}

inline void mgd_syncwarp() {
  if (mgd_order == 0) mgd_warp_barriers[threadIdx.x >> 5]->arrive_and_wait();
  else mgd_sched.sync(1 + int(threadIdx.x >> 5), 32);
}

inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  mgd_shuffle_slots[threadIdx.x] = v;
  mgd_syncwarp();
  const float other = mgd_shuffle_slots[threadIdx.x ^ lane_mask];
  mgd_syncwarp();
  return other;
}

inline float rsqrtf(float x) { return 1.f / sqrtf(x); }
using std::max;
using std::min;
