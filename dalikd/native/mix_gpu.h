// The CUDA kernel's interface, free of DALI headers so that nvcc compiles only the kernel
// (mix_gpu.cu) and g++ compiles the DALI operator around it (mix_gpu.cc).
#ifndef DALIKD_NATIVE_MIX_GPU_H_
#define DALIKD_NATIVE_MIX_GPU_H_

#include <cuda_runtime_api.h>

#include <cstdint>

namespace dalikd {

// One candidate of one sample, as the kernel reads it (device pointers).
struct GpuCandidate {
  uint8_t *out;
  const uint8_t *own;
  const uint8_t *partner;
  float *lam_out;  // this candidate's slot in the lambda output
  int64_t pixels;  // H * W
  int W, C;
  int y0, x0, y1, x1;  // CutMix box [y0, y1) x [x0, x1)
  float lam;
};

// Mixes `count` candidates (`cands` in device memory) on `stream`; mode as MixMode.
// `max_pixels` sizes the grid. Returns the launch's error code.
cudaError_t LaunchMix(const GpuCandidate *cands, int count, int64_t max_pixels, int mode,
                      cudaStream_t stream);

}  // namespace dalikd

#endif  // DALIKD_NATIVE_MIX_GPU_H_
