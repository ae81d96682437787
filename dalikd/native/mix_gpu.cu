// GPU implementation of DalikdMix (see mix.h): one kernel launch for all k candidates of the
// batch. blockIdx.y is the (sample, candidate) pair, blockIdx.x/threadIdx.x stride over its
// pixels. Never run on a GPU so far: dalikd reports it as unverified.
#include <algorithm>

#include "dali/kernels/dynamic_scratchpad.h"
#include "mix.h"

namespace dalikd {

namespace {

struct GpuCandidate {
  uint8_t *out;
  const uint8_t *own;
  const uint8_t *partner;
  float *lam_out;  // this candidate's slot in output k
  int64_t pixels;  // H * W
  int W, C;
  int y0, x0, y1, x1;  // CutMix box [y0, y1) x [x0, x1)
  float lam;
};

__global__ void MixKernel(const GpuCandidate *cands, int mode) {
  const GpuCandidate c = cands[blockIdx.y];
  if (blockIdx.x == 0 && threadIdx.x == 0) *c.lam_out = c.lam;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; p < c.pixels;
       p += stride) {
    const int64_t base = p * c.C;
    if (mode == static_cast<int>(MixMode::kCutMix)) {
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

class MixGPU : public MixBase<dali::GPUBackend> {
 public:
  explicit MixGPU(const dali::OpSpec &spec) : MixBase<dali::GPUBackend>(spec) {}

 protected:
  void RunImpl(dali::Workspace &ws) override {
    const auto &in = ws.Input<dali::GPUBackend>(0);
    const auto &shape = in.shape();
    const int n = shape.num_samples();
    if (n == 0) return;
    const auto cands = ReadCandidates(spec_, ws, mode_, k_, shape);

    auto &lam_out = ws.Output<dali::GPUBackend>(k_);
    std::vector<GpuCandidate> host(static_cast<size_t>(n) * k_);
    int64_t max_pixels = 0;
    for (int j = 0; j < k_; j++) {
      auto &out = ws.Output<dali::GPUBackend>(j);
      out.SetLayout(in.GetLayout());
      for (int i = 0; i < n; i++) {
        const auto sh = shape.tensor_shape(i);
        const Candidate &c = cands[i * k_ + j];
        GpuCandidate &g = host[static_cast<size_t>(j) * n + i];
        g.out = out.mutable_tensor<uint8_t>(i);
        g.own = in.tensor<uint8_t>(i);
        g.partner = in.tensor<uint8_t>(c.partner);
        g.lam_out = lam_out.mutable_tensor<float>(i) + j;
        g.pixels = sh[0] * sh[1];
        g.W = static_cast<int>(sh[1]);
        g.C = static_cast<int>(sh[2]);
        g.y0 = c.y0;
        g.x0 = c.x0;
        g.y1 = c.y0 + c.h;
        g.x1 = c.x0 + c.w;
        g.lam = c.lam;
        max_pixels = std::max(max_pixels, g.pixels);
      }
    }
    dali::kernels::DynamicScratchpad scratch(dali::AccessOrder(ws.stream()));
    const GpuCandidate *dev = scratch.ToGPU(ws.stream(), host);
    const int block = 256;
    const int blocks_x = static_cast<int>(std::min<int64_t>((max_pixels + block - 1) / block, 64));
    dim3 grid(std::max(blocks_x, 1), static_cast<unsigned>(host.size()));
    MixKernel<<<grid, block, 0, ws.stream()>>>(dev, static_cast<int>(mode_));
    CUDA_CALL(cudaGetLastError());
  }
};

}  // namespace dalikd

DALI_REGISTER_OPERATOR(DalikdMix, ::dalikd::MixGPU, ::dali::GPU);
