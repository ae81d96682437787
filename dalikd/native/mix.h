// dalikd's fused mixing operator, shared by the CPU (mix_cpu.cc) and GPU (mix_gpu.cu) builds.
//
// DalikdMix writes k mixed candidates per sample in one pass: candidate j of sample i is
// CutMix (the own image with a box pasted from sample perm[i][j]) or MixUp (a blend with that
// sample). All random draws (partner, box, lambda) come in as CPU argument inputs, made by DALI's
// random operators, so seeding and checkpointing stay DALI's; the operator itself is stateless.
//
// Inputs:  0 = images, uint8, HWC, every sample the same shape as its partners.
// Outputs: 0 .. k-1 = the candidates (uint8, like the input); k .. 2k-1 = their lambdas, a
//          float32 scalar per sample: the fraction of the sample's own pixels in the candidate.
#ifndef DALIKD_NATIVE_MIX_H_
#define DALIKD_NATIVE_MIX_H_

#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "dali/pipeline/operator/checkpointing/stateless_operator.h"
#include "dali/pipeline/operator/operator.h"

namespace dalikd {

enum class MixMode : int { kCutMix = 0, kMixUp = 1 };

// One candidate: which sample is pasted/blended in, the box (CutMix) and lambda.
struct Candidate {
  int partner;
  int y0, x0, h, w;  // CutMix box in px, (y, x) / (h, w); unused for MixUp
  float lam;         // CutMix: 1 - h*w / (H*W) of the clipped box; MixUp: the given lambda
};

inline int64_t Clamp(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// The CutMix box of Yun et al.'s reference code, in the float32 arithmetic of dalikd.ops
// (cutmix_box and the box's lambda), so the result is bit-identical to the composed graph:
// half = int(floor(S * sqrt(1 - lam))) / 2 per axis (S = H for y, W for x), the box spans
// [c - half, c + half) clipped to the image, lambda = 1 - float(h*w) / float(H*W).
inline Candidate CutMixBox(int partner, int64_t cy, int64_t cx, float lam, int64_t H,
                           int64_t W) {
  const float r = std::sqrt(1.0f - lam);
  const int64_t half_y = static_cast<int64_t>(std::floor(static_cast<float>(H) * r)) / 2;
  const int64_t half_x = static_cast<int64_t>(std::floor(static_cast<float>(W) * r)) / 2;
  const int64_t y0 = Clamp(cy - half_y, 0, H), y1 = Clamp(cy + half_y, 0, H);
  const int64_t x0 = Clamp(cx - half_x, 0, W), x1 = Clamp(cx + half_x, 0, W);
  Candidate c{partner, static_cast<int>(y0), static_cast<int>(x0), static_cast<int>(y1 - y0),
              static_cast<int>(x1 - x0), 0.0f};
  c.lam = 1.0f - static_cast<float>((y1 - y0) * (x1 - x0)) / static_cast<float>(H * W);
  return c;
}

inline MixMode ParseMode(const dali::OpSpec &spec) {
  auto mode = spec.GetArgument<std::string>("mode");
  if (mode == "cutmix") return MixMode::kCutMix;
  if (mode == "mixup") return MixMode::kMixUp;
  DALI_FAIL(dali::make_string("DalikdMix: mode '", mode, "'; known: cutmix, mixup"));
}

// The k candidates of every sample, row-major ([i * k + j]), validated against the images'
// shapes. Argument inputs are CPU TensorLists whatever the operator's backend; each holds k
// values per sample ((k,) or, for k = 1, a scalar; `centre` (k, 2) or (2,)).
inline std::vector<Candidate> ReadCandidates(const dali::OpSpec &spec, const dali::Workspace &ws,
                                             MixMode mode, int k,
                                             const dali::TensorListShape<> &shape) {
  const int n = shape.num_samples();
  const bool cutmix = mode == MixMode::kCutMix;
  DALI_ENFORCE(spec.HasTensorArgument("perm") && spec.HasTensorArgument("lam") &&
                   (!cutmix || spec.HasTensorArgument("centre")),
               cutmix ? "DalikdMix: mode 'cutmix' needs `perm` int32 (k,), `lam` float32 (k,) "
                        "and `centre` int32 (k, 2)"
                      : "DalikdMix: mode 'mixup' needs `perm` int32 (k,) and `lam` float32 (k,)");
  const auto &perm = ws.ArgumentInput("perm");
  const auto &lam = ws.ArgumentInput("lam");
  DALI_ENFORCE(perm.type() == DALI_INT32, "DalikdMix: `perm` must be int32");
  DALI_ENFORCE(lam.type() == DALI_FLOAT, "DalikdMix: `lam` must be float32");
  const dali::TensorList<dali::CPUBackend> *centre = nullptr;
  if (cutmix) {
    centre = &ws.ArgumentInput("centre");
    DALI_ENFORCE(centre->type() == DALI_INT32, "DalikdMix: `centre` must be int32");
  }
  std::vector<Candidate> cands(static_cast<size_t>(n) * k);
  for (int i = 0; i < n; i++) {
    DALI_ENFORCE(perm.tensor_shape(i).num_elements() == k &&
                     lam.tensor_shape(i).num_elements() == k &&
                     (!cutmix || centre->tensor_shape(i).num_elements() == 2 * k),
                 dali::make_string("DalikdMix: sample ", i, " needs ", k, " values of `perm` and "
                                   "`lam`", cutmix ? " and (y, x) pairs of `centre`" : "",
                                   " (one per candidate)"));
    const auto sh = shape.tensor_shape(i);
    for (int j = 0; j < k; j++) {
      const int partner = perm.tensor<int32_t>(i)[j];
      const float l = lam.tensor<float>(i)[j];
      DALI_ENFORCE(partner >= 0 && partner < n,
                   dali::make_string("DalikdMix: partner ", partner, " of sample ", i,
                                     " is outside the batch of ", n));
      DALI_ENFORCE(shape.tensor_shape(partner) == sh,
                   dali::make_string("DalikdMix: sample ", i, " has shape ", sh,
                                     " but its partner ", partner, " has ",
                                     shape.tensor_shape(partner)));
      DALI_ENFORCE(l >= 0.0f && l <= 1.0f,  // false for NaN too
                   dali::make_string("DalikdMix: lambda ", l, " of sample ", i,
                                     " is outside [0, 1]"));
      if (cutmix) {
        const int32_t *c = centre->tensor<int32_t>(i) + 2 * j;
        cands[static_cast<size_t>(i) * k + j] = CutMixBox(partner, c[0], c[1], l, sh[0], sh[1]);
      } else {
        cands[static_cast<size_t>(i) * k + j] = Candidate{partner, 0, 0, 0, 0, l};
      }
    }
  }
  return cands;
}

// Base of both backends: arguments, checks and output shapes.
template <typename Backend>
class MixBase : public dali::StatelessOperator<Backend> {
 public:
  explicit MixBase(const dali::OpSpec &spec)
      : dali::StatelessOperator<Backend>(spec),
        mode_(ParseMode(spec)),
        k_(spec.GetArgument<int>("candidates")) {
    DALI_ENFORCE(k_ >= 1, "DalikdMix: `candidates` must be >= 1");
  }

 protected:
  bool SetupImpl(std::vector<dali::OutputDesc> &output_desc, const dali::Workspace &ws) override {
    const auto &in = ws.Input<Backend>(0);
    DALI_ENFORCE(in.type() == DALI_UINT8, "DalikdMix: images must be uint8");
    DALI_ENFORCE(in.sample_dim() == 3, "DalikdMix: images must be HWC (3 dimensions)");
    const int n = in.num_samples();
    output_desc.resize(2 * k_);
    for (int j = 0; j < k_; j++) {
      output_desc[j] = {in.shape(), DALI_UINT8};
      output_desc[k_ + j] = {dali::uniform_list_shape(n, dali::TensorShape<0>{}), DALI_FLOAT};
    }
    return true;
  }

  MixMode mode_;
  int k_;
};

}  // namespace dalikd

#endif  // DALIKD_NATIVE_MIX_H_
