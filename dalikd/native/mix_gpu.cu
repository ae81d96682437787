// The CUDA kernel of DalikdMix (see mix.h): one launch for all k candidates of the batch.
// blockIdx.y is the (sample, candidate) pair; blockIdx.x/threadIdx.x stride over its pixels.
// Run on an H200 through tests/cuda/mix_kernel_shim.cu (bit-identical to NumPy references);
// the DALI operator around it (mix_gpu.cc) has not run on a GPU: dalikd reports it unverified.
#include "mix_gpu.h"

namespace dalikd {

namespace {

constexpr int kCutMix = 0;  // MixMode::kCutMix (mix.h is not included: no DALI headers here)

__global__ void MixKernel(const GpuCandidate *cands, int mode) {
  const GpuCandidate c = cands[blockIdx.y];
  if (blockIdx.x == 0 && threadIdx.x == 0) *c.lam_out = c.lam;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < c.pixels;
       p += stride) {
    const int64_t base = p * c.C;
    if (mode == kCutMix) {
      const int y = static_cast<int>(p / c.W), x = static_cast<int>(p % c.W);
      const bool inside = y >= c.y0 && y < c.y1 && x >= c.x0 && x < c.x1;
      const uint8_t *src = inside ? c.partner : c.own;
      for (int ch = 0; ch < c.C; ch++) c.out[base + ch] = src[base + ch];
    } else {
      // The CPU arithmetic, with explicit round-to-nearest intrinsics so nvcc cannot contract
      // it into a fused multiply-add: v = x*lam + p*(1 - lam); floor(v + 0.5), saturated.
      const float take = __fsub_rn(1.0f, c.lam);
      for (int ch = 0; ch < c.C; ch++) {
        float v = __fadd_rn(__fmul_rn(static_cast<float>(c.own[base + ch]), c.lam),
                            __fmul_rn(static_cast<float>(c.partner[base + ch]), take));
        v = fminf(fmaxf(__fadd_rn(v, 0.5f), 0.0f), 255.0f);
        c.out[base + ch] = static_cast<uint8_t>(static_cast<int>(v));
      }
    }
  }
}

}  // namespace

cudaError_t LaunchMix(const GpuCandidate *cands, int count, int64_t max_pixels, int mode,
                      cudaStream_t stream) {
  if (count == 0) return cudaSuccess;
  const int block = 256;
  int64_t blocks_x = (max_pixels + block - 1) / block;
  blocks_x = blocks_x < 1 ? 1 : (blocks_x > 64 ? 64 : blocks_x);  // grid-stride beyond 64
  constexpr int kMaxGridY = 65535;  // CUDA's limit on gridDim.y: larger batches go in chunks
  for (int first = 0; first < count; first += kMaxGridY) {
    const int chunk = count - first < kMaxGridY ? count - first : kMaxGridY;
    dim3 grid(static_cast<unsigned>(blocks_x), static_cast<unsigned>(chunk));
    MixKernel<<<grid, block, 0, stream>>>(cands + first, mode);
    const cudaError_t err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return cudaSuccess;
}

}  // namespace dalikd
