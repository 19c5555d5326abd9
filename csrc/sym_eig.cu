// Batched eigen-decomposition of small symmetric matrices (n <= 64): parallel cyclic Jacobi,
// one thread block per matrix, the matrix and its eigenvectors in shared memory.
//
// The same algorithm as manifoldgd_fast/kernels/sym_eig.py (Triton) and manifoldgd_fast/kernels/sym_eig_torch.py (PyTorch):
// round-robin ordering (K = n rounded up to even; in round r index i pairs with
// (2r - i) mod (K - 1), r with K - 1), so the K/2 rotations of a round touch disjoint
// rows/columns and run at once; the classical angle and Numerical Recipes' small-correction
// updates  p' = p - s (q + tau p),  q' = q + s (p - tau q),  tau = s / (1 + c),  with the
// rotated pair set to zero and the diagonal to a_pp - t a_pq, a_qq + t a_pq.
// Sweeps stop when the off-diagonal mass <= tol^2 |A|_F^2 (decided inside the kernel: no host
// synchronisation, so the launch can be captured in a CUDA graph) or after max_sweeps.
// Output: eigenvalues descending (ties: lower position first) and the matching columns of V.
// A matrix whose largest entry lies outside [2^-50, 2^50] is divided by it first and its
// eigenvalues multiplied back (|A|_F^2, up to n^2 amax^2, would overflow or underflow fp32); NaN / inf entries make
// every output of their matrix NaN. As the Triton and PyTorch solvers do.
//
// Pure CUDA runtime (no torch headers), so CI compiles it with plain nvcc; the PyTorch binding
// is compiled at run time by manifoldgd_fast/kernels/cuda_ext.py (torch.utils.cpp_extension.load_inline).
// Without nvcc, cuda_ext compiles the kernel alone with NVRTC (through CuPy) and launches it itself:
// under NVRTC (__CUDACC_RTC__) the runtime header and the host launcher drop out.

#ifndef __CUDACC_RTC__
#include <cuda_runtime.h>
#endif

namespace {

constexpr int kMaxN = 64;
constexpr int kThreads = 256;

__device__ __forceinline__ float block_sum(float v, float* red) {
  // sum over the block; every thread gets the result
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float s = 0.f;
  for (int w = 0; w < kThreads / 32; ++w) s += red[w];
  return s;
}

__device__ __forceinline__ float block_max(float v, float* red) {
  // max over the block (NaN ignored, as fmaxf does); every thread gets the result
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();
  if (lane == 0) red[warp] = v;
  __syncthreads();
  float m = red[0];
  for (int w = 1; w < kThreads / 32; ++w) m = fmaxf(m, red[w]);
  return m;
}

constexpr float kRescaleAbove = 1.125899906842624e15f;   // 2^50: |A|_F^2 <= 64^2 2^100 = 2^112 stays finite
constexpr float kRescaleBelow = 8.881784197001252e-16f;  // 2^-50

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads)
mgd_sym_eig_f32(const float* __restrict__ A, float* __restrict__ w, float* __restrict__ V,
                int n, int max_sweeps, float tol) {
  __shared__ float a[kMaxN][kMaxN + 1];
  __shared__ float v[kMaxN][kMaxN + 1];
  __shared__ int pp[kMaxN / 2], pq[kMaxN / 2];          // the pairs (p < q) of the current round
  __shared__ float ps[kMaxN / 2], ptau[kMaxN / 2], pt[kMaxN / 2], papq[kMaxN / 2];
  __shared__ float pdp[kMaxN / 2], pdq[kMaxN / 2];
  __shared__ float red[kThreads / 32];
  __shared__ float evals[kMaxN];

  const int tid = threadIdx.x;
  const long long b = blockIdx.x;
  const int K = n + (n & 1);
  const float* Ab = A + b * n * n;

  float amax = 0.f, bad = 0.f;
  for (int e = tid; e < K * K; e += kThreads) {
    const int i = e / K, j = e % K;
    const float x = (i < n && j < n) ? 0.5f * Ab[i * n + j] + 0.5f * Ab[j * n + i] : 0.f;
    a[i][j] = x;
    v[i][j] = (i == j) ? 1.f : 0.f;
    amax = fmaxf(amax, fabsf(x));
    bad += x * 0.f;                                     // NaN where an entry is NaN or inf
  }
  amax = block_max(amax, red);
  bad = block_sum(bad, red);
  const float scale = (amax > kRescaleAbove || (amax > 0.f && amax < kRescaleBelow)) ? amax : 1.f;
  float fro = 0.f;
  for (int e = tid; e < K * K; e += kThreads) {
    const int i = e / K, j = e % K;
    a[i][j] /= scale;
    fro += a[i][j] * a[i][j];
  }
  fro = block_sum(fro, red);

  for (int sweep = 0; sweep < max_sweeps; ++sweep) {
    float off = 0.f;
    for (int e = tid; e < K * K; e += kThreads) {
      const int i = e / K, j = e % K;
      if (i != j) off += a[i][j] * a[i][j];
    }
    off = block_sum(off, red);
    if (!(off > tol * tol * fro)) break;               // uniform across the block

    for (int r = 0; r < K - 1; ++r) {
      // 1. the angle of every pair of this round
      if (tid < K / 2) {
        int i, j;
        if (tid == 0) { i = r; j = K - 1; }
        else { i = (r - tid + (K - 1)) % (K - 1); j = (r + tid) % (K - 1); }
        const int p = min(i, j), q = max(i, j);
        const float app = a[p][p], aqq = a[q][q];
        const float apq = 0.5f * (a[p][q] + a[q][p]);
        float t = 0.f, s = 0.f, tau = 0.f;
        if (apq != 0.f) {
          const float theta = (aqq - app) / (2.f * apq);
          if (fabsf(theta) > 1e15f) t = 0.5f / theta;
          else t = (theta >= 0.f ? 1.f : -1.f) / (fabsf(theta) + sqrtf(theta * theta + 1.f));
          const float c = rsqrtf(t * t + 1.f);
          s = t * c;
          tau = s / (1.f + c);
        }
        pp[tid] = p; pq[tid] = q; ps[tid] = s; ptau[tid] = tau; pt[tid] = t; papq[tid] = apq;
        pdp[tid] = app; pdq[tid] = aqq;
      }
      __syncthreads();
      // 2. rows p, q of A (J^T A): each item owns one (pair, column), no two items share an element
      for (int e = tid; e < (K / 2) * K; e += kThreads) {
        const int m = e / K, j = e % K;
        const int p = pp[m], q = pq[m];
        const float s = ps[m], tau = ptau[m];
        const float x = a[p][j], y = a[q][j];
        a[p][j] = x - s * (y + tau * x);
        a[q][j] = y + s * (x - tau * y);
      }
      __syncthreads();
      // 3. columns p, q of A and of V ((J^T A) J, V J)
      for (int e = tid; e < (K / 2) * K; e += kThreads) {
        const int m = e / K, i = e % K;
        const int p = pp[m], q = pq[m];
        const float s = ps[m], tau = ptau[m];
        const float x = a[i][p], y = a[i][q];
        a[i][p] = x - s * (y + tau * x);
        a[i][q] = y + s * (x - tau * y);
        const float vx = v[i][p], vy = v[i][q];
        v[i][p] = vx - s * (vy + tau * vx);
        v[i][q] = vy + s * (vx - tau * vy);
      }
      __syncthreads();
      // 4. the rotated pairs are zero by construction; the diagonal from the exact update
      if (tid < K / 2) {
        const int p = pp[tid], q = pq[tid];
        if (ps[tid] != 0.f) {
          a[p][q] = 0.f;
          a[q][p] = 0.f;
          a[p][p] = pdp[tid] - pt[tid] * papq[tid];
          a[q][q] = pdq[tid] + pt[tid] * papq[tid];
        }
      }
      __syncthreads();
    }
  }

  // descending order by rank; ties keep the lower position first
  if (tid < n) evals[tid] = a[tid][tid] * scale;
  __syncthreads();
  if (tid < n) {
    const float x = evals[tid];
    int rank = 0;
    for (int j = 0; j < n; ++j) rank += (evals[j] > x) || (evals[j] == x && j < tid);
    if (bad != 0.f) rank = tid;                         // NaN: every output NaN, in place
    w[b * n + rank] = x + bad;
    for (int i = 0; i < n; ++i) V[b * n * n + (long long)i * n + rank] = v[i][tid] + bad;
  }
}

#ifndef __CUDACC_RTC__
// Host launcher (plain C ABI, so the run-time binding needs no CUDA headers): returns the
// cudaError_t of the launch, or minus the error an earlier call left pending (not this launch's:
// cudaGetLastError would report it as ours, and clear it). `stream` is a cudaStream_t (the
// caller's current stream).
extern "C" int mgd_sym_eig_f32_launch(const float* A, float* w, float* V, int batch, int n,
                                      int max_sweeps, float tol, void* stream) {
  if (n < 1 || n > kMaxN || batch < 1) return static_cast<int>(cudaErrorInvalidValue);
  const cudaError_t pending = cudaPeekAtLastError();
  if (pending != cudaSuccess) return -static_cast<int>(pending);
  mgd_sym_eig_f32<<<batch, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(A, w, V, n, max_sweeps, tol);
  return static_cast<int>(cudaGetLastError());
}

// The name and description of a cudaError_t, for the binding's messages.
extern "C" const char* mgd_cuda_error_string(int err) {
  return cudaGetErrorString(static_cast<cudaError_t>(err));
}
#endif  // __CUDACC_RTC__
