// CPU implementation and schema of DalikdMix (see mix.h). One task per (sample, candidate) on
// DALI's thread pool; each task writes its candidate in a single pass over the output.
#include <algorithm>
#include <cstring>

#include "mix.h"

namespace dalikd {

namespace {

// CutMix: rows outside the box are the own image; inside, [x0, x0 + w) comes from the partner.
void PasteBox(uint8_t *out, const uint8_t *own, const uint8_t *partner, int64_t H, int64_t W,
              int64_t C, const Candidate &c) {
  const int64_t row = W * C;
  const int64_t y1 = c.w > 0 ? c.y0 + c.h : c.y0;  // an empty box pastes nothing
  std::memcpy(out, own, c.y0 * row);
  const int64_t a = c.x0 * C, b = (c.x0 + c.w) * C;
  for (int64_t y = c.y0; y < y1; y++) {
    const int64_t o = y * row;
    std::memcpy(out + o, own + o, a);
    std::memcpy(out + o + a, partner + o + a, b - a);
    std::memcpy(out + o + b, own + o + b, row - b);
  }
  std::memcpy(out + y1 * row, own + y1 * row, (H - y1) * row);
}

// MixUp in float32, exactly the composed graph's order: v = x*lam + p*(1 - lam), then
// floor(v + 0.5) saturated to [0, 255]. Clamping to [0, 255] before truncating equals floor then
// saturate for every finite v (and lets the loop vectorize without a floor call). The library
// is built with -ffp-contract=off, so no fused multiply-add changes the rounding.
__attribute__((target_clones("avx2", "default")))  // the same float32 ops, wider
void Blend(uint8_t *out, const uint8_t *own, const uint8_t *partner, int64_t volume, float lam) {
  const float keep = lam, take = 1.0f - lam;
  for (int64_t t = 0; t < volume; t++) {
    float v = static_cast<float>(own[t]) * keep + static_cast<float>(partner[t]) * take;
    v = std::min(std::max(v + 0.5f, 0.0f), 255.0f);
    out[t] = static_cast<uint8_t>(static_cast<int32_t>(v));
  }
}

}  // namespace

class MixCPU : public MixBase<dali::CPUBackend> {
 public:
  explicit MixCPU(const dali::OpSpec &spec) : MixBase<dali::CPUBackend>(spec) {}

 protected:
  void RunImpl(dali::Workspace &ws) override {
    const auto &in = ws.Input<dali::CPUBackend>(0);
    const auto &shape = in.shape();
    const int n = shape.num_samples();
    const auto cands = ReadCandidates(spec_, ws, mode_, k_, shape);

    for (int j = 0; j < k_; j++) {
      auto &lam_out = ws.Output<dali::CPUBackend>(k_ + j);
      for (int i = 0; i < n; i++) *lam_out.mutable_tensor<float>(i) = cands[i * k_ + j].lam;
    }

    auto &pool = ws.GetThreadPool();
    for (int j = 0; j < k_; j++) {
      auto *out = &ws.Output<dali::CPUBackend>(j);
      out->SetLayout(in.GetLayout());
      for (int i = 0; i < n; i++) {
        const auto sh = shape.tensor_shape(i);
        const Candidate c = cands[i * k_ + j];
        const int64_t volume = sh.num_elements();
        pool.AddWork(
            [this, out, &in, sh, c, i, volume](int) {
              uint8_t *dst = out->mutable_tensor<uint8_t>(i);
              const uint8_t *own = in.tensor<uint8_t>(i);
              const uint8_t *partner = in.tensor<uint8_t>(c.partner);
              if (mode_ == MixMode::kCutMix)
                PasteBox(dst, own, partner, sh[0], sh[1], sh[2], c);
              else
                Blend(dst, own, partner, volume, c.lam);
            },
            volume);
      }
    }
    pool.RunAll();
  }
};

}  // namespace dalikd

DALI_REGISTER_OPERATOR(DalikdMix, ::dalikd::MixCPU, ::dali::CPU);

DALI_SCHEMA(DalikdMix)
    .DocStr(R"(dalikd's fused CutMix / MixUp: k mixed candidates per sample in one pass.

Input: uint8 HWC images. Outputs: ``candidates`` images like the input, then as many lambdas,
a float32 scalar per sample each (the fraction of the sample's own pixels in that candidate).
Every random draw is an argument input, so the operator is stateless.)")
    .NumInput(1)
    .InputLayout(0, "HWC")
    .OutputFn([](const dali::OpSpec &spec) { return 2 * spec.GetArgument<int>("candidates"); })
    .AddArg("mode", "'cutmix' (paste a box of the partner) or 'mixup' (blend with it)",
            DALI_STRING)
    .AddOptionalArg("candidates", "k: mixed candidates per sample (outputs 0 .. k-1)", 1)
    .AddOptionalArg<std::vector<int>>("perm", "int32 (k,) per sample: each candidate's partner",
                                      nullptr, true)
    .AddOptionalArg<std::vector<float>>(
        "lam",
        "float32 (k,) per sample, in [0, 1]. mixup: the own image's weight. cutmix: the drawn "
        "lambda that sizes the box (side floor(S * sqrt(1 - lambda)), Yun et al.); the lambda "
        "output is recomputed from the clipped box",
        nullptr, true)
    .AddOptionalArg<std::vector<int>>("centre",
                                      "cutmix: int32 (k, 2) per sample, the box centre (y, x)",
                                      nullptr, true);
