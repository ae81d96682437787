// GPU operator of DalikdMix (see mix.h): gathers the candidates on the host, copies them to
// the device and launches the kernel of mix_gpu.cu once for the whole batch.
#include <algorithm>

#include "dali/kernels/dynamic_scratchpad.h"
#include "mix.h"
#include "mix_gpu.h"

namespace dalikd {

class MixGPU : public MixBase<dali::GPUBackend> {
 public:
  explicit MixGPU(const dali::OpSpec &spec) : MixBase<dali::GPUBackend>(spec) {}

 protected:
  void RunImpl(dali::Workspace &ws) override {
    const auto &in = ws.Input<dali::GPUBackend>(0);
    const auto &shape = in.shape();
    const int n = shape.num_samples();
    const auto cands = ReadCandidates(spec_, ws, mode_, k_, shape);

    std::vector<GpuCandidate> host(static_cast<size_t>(n) * k_);
    int64_t max_pixels = 0;
    for (int j = 0; j < k_; j++) {
      auto &out = ws.Output<dali::GPUBackend>(j);
      auto &lam_out = ws.Output<dali::GPUBackend>(k_ + j);
      out.SetLayout(in.GetLayout());
      for (int i = 0; i < n; i++) {
        const auto sh = shape.tensor_shape(i);
        const Candidate &c = cands[i * k_ + j];
        GpuCandidate &g = host[static_cast<size_t>(j) * n + i];
        g.out = out.mutable_tensor<uint8_t>(i);
        g.own = in.tensor<uint8_t>(i);
        g.partner = in.tensor<uint8_t>(c.partner);
        g.lam_out = lam_out.mutable_tensor<float>(i);
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
    if (host.empty()) return;
    dali::kernels::DynamicScratchpad scratch(dali::AccessOrder(ws.stream()));
    const GpuCandidate *dev = scratch.ToGPU(ws.stream(), host);
    CUDA_CALL(LaunchMix(dev, static_cast<int>(host.size()), max_pixels,
                        static_cast<int>(mode_), ws.stream()));
  }
};

}  // namespace dalikd

DALI_REGISTER_OPERATOR(DalikdMix, ::dalikd::MixGPU, ::dali::GPU);
