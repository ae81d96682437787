// Test-only wrapper around dalikd::LaunchMix (dalikd/native/mix_gpu.cu), loadable with ctypes
// and free of DALI: tests/test_cuda_mix_kernel.py compiles it together with the kernel.
//
// The batch is one contiguous uint8 tensor [N, H, W, C] on the device; the outputs are one
// uint8 tensor [k, N, H, W, C] (candidate j of sample i at out[j, i]) and a float32 [N, k]
// lambda tensor. The per-candidate parameters are host arrays in row-major [N, k] order
// (index i * k + j); the GpuCandidate structs are built here, in C++, as mix_gpu.cc does, so
// Python never has to mirror their layout.
#include <cstdint>
#include <vector>

#include "mix_gpu.h"

extern "C" int dalikd_test_launch_mix(const uint8_t *images, uint8_t *out, float *lam_out, int n,
                                      int k, int H, int W, int C, const int32_t *partner,
                                      const int32_t *y0, const int32_t *x0, const int32_t *y1,
                                      const int32_t *x1, const float *lam, int mode) {
  const int64_t volume = static_cast<int64_t>(H) * W * C;
  std::vector<dalikd::GpuCandidate> host(static_cast<size_t>(n) * k);
  for (int j = 0; j < k; j++) {
    for (int i = 0; i < n; i++) {
      const size_t a = static_cast<size_t>(i) * k + j;  // argument index, [N, k]
      dalikd::GpuCandidate &g = host[static_cast<size_t>(j) * n + i];  // mix_gpu.cc's order
      g.out = out + (static_cast<int64_t>(j) * n + i) * volume;
      g.own = images + i * volume;
      g.partner = images + partner[a] * volume;
      g.lam_out = lam_out + a;
      g.pixels = static_cast<int64_t>(H) * W;
      g.W = W;
      g.C = C;
      g.y0 = y0[a];
      g.x0 = x0[a];
      g.y1 = y1[a];
      g.x1 = x1[a];
      g.lam = lam[a];
    }
  }
  if (host.empty()) return cudaSuccess;

  dalikd::GpuCandidate *dev = nullptr;
  const size_t bytes = host.size() * sizeof(dalikd::GpuCandidate);
  cudaError_t err = cudaMalloc(&dev, bytes);
  if (err != cudaSuccess) return err;
  err = cudaMemcpy(dev, host.data(), bytes, cudaMemcpyHostToDevice);
  if (err == cudaSuccess)
    err = dalikd::LaunchMix(dev, static_cast<int>(host.size()), static_cast<int64_t>(H) * W,
                            mode, /*stream=*/0);
  if (err == cudaSuccess) err = cudaDeviceSynchronize();  // also reports the kernel's faults
  const cudaError_t freed = cudaFree(dev);
  return err != cudaSuccess ? err : freed;
}
