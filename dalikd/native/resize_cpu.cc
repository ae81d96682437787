// CPU operator DalikdResize (see resize.h): antialiased bilinear resize of uint8 HWC images,
// each sample to its own output size, with a per-sample horizontal flip fused in. One task per
// sample on DALI's thread pool. The two passes are compiled twice (AVX2 and baseline x86-64);
// the loader picks one for the CPU it runs on (target_clones), as DalikdMix's blend does.
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <string>

#include "dali/pipeline/operator/checkpointing/stateless_operator.h"
#include "dali/pipeline/operator/operator.h"
#include "resize.h"

namespace dalikd {

namespace {

// One input row -> one output row of out_w pixels (c = 3: the channel loop unrolled).
template <int C>
inline void HorizontalRowC(const uint8_t *src, uint8_t *dst, const AxisWeights &ax,
                           int64_t out_w, bool flip) {
  const int32_t half = 1 << (kPrecisionBits - 1);
  for (int64_t x = 0; x < out_w; x++) {
    const uint8_t *p = src + static_cast<int64_t>(ax.first[x]) * C;
    const int32_t *w = ax.weight.data() + x * ax.taps;
    const int n = ax.count[x];
    int32_t s[C];
    for (int ch = 0; ch < C; ch++) s[ch] = half;
    for (int t = 0; t < n; t++)
      for (int ch = 0; ch < C; ch++) s[ch] += static_cast<int32_t>(p[t * C + ch]) * w[t];
    uint8_t *o = dst + (flip ? out_w - 1 - x : x) * C;
    for (int ch = 0; ch < C; ch++) o[ch] = ClipShift(s[ch]);
  }
}

// c = 3 with AVX2: one pixel's 3 channels (and a 4th byte, whose result is dropped) per
// 128-bit int32 multiply-add, two taps per step. Reading that 4th byte is safe everywhere but
// at the buffer's very last pixel, which `last_safe` (the pixels x whose x*3 + 4 bytes lie in
// the buffer) leaves to the scalar row.
__attribute__((target("avx2"))) void HorizontalRow3Avx2(const uint8_t *src, uint8_t *dst,
                                                          const AxisWeights &ax, int64_t out_w,
                                                          bool flip, int64_t last_safe) {
  const __m128i half = _mm_set1_epi32(1 << (kPrecisionBits - 1));
  for (int64_t x = 0; x < out_w; x++) {
    const int first = ax.first[x], n = ax.count[x];
    uint8_t *o = dst + (flip ? out_w - 1 - x : x) * 3;
    if (first + n - 1 > last_safe) {  // the buffer's last pixel: scalar
      const int32_t *w = ax.weight.data() + x * ax.taps;
      int32_t s[3] = {1 << (kPrecisionBits - 1), 1 << (kPrecisionBits - 1),
                      1 << (kPrecisionBits - 1)};
      for (int t = 0; t < n; t++)
        for (int ch = 0; ch < 3; ch++)
          s[ch] += static_cast<int32_t>(src[(first + t) * 3 + ch]) * w[t];
      for (int ch = 0; ch < 3; ch++) o[ch] = ClipShift(s[ch]);
      continue;
    }
    const uint8_t *p = src + static_cast<int64_t>(first) * 3;
    const int32_t *w = ax.weight.data() + x * ax.taps;
    __m128i acc = half;
    for (int t = 0; t < n; t++) {
      int32_t px;
      std::memcpy(&px, p + t * 3, 4);
      const __m128i v = _mm_cvtepu8_epi32(_mm_cvtsi32_si128(px));
      acc = _mm_add_epi32(acc, _mm_mullo_epi32(v, _mm_set1_epi32(w[t])));
    }
    acc = _mm_srai_epi32(acc, kPrecisionBits);
    // saturate int32 -> uint8: packs (signed 16) then packus (unsigned 8)
    const __m128i bytes = _mm_packus_epi16(_mm_packs_epi32(acc, acc), _mm_setzero_si128());
    const int32_t out = _mm_cvtsi128_si32(bytes);
    o[0] = static_cast<uint8_t>(out);
    o[1] = static_cast<uint8_t>(out >> 8);
    o[2] = static_cast<uint8_t>(out >> 16);
  }
}

bool HasAvx2() {  // asked once per process
  static const bool has = (__builtin_cpu_init(), __builtin_cpu_supports("avx2"));
  return has;
}

__attribute__((target_clones("avx2", "default")))
void HorizontalPass(const uint8_t *in, int64_t in_h, int64_t in_w, int64_t c, int64_t y0,
                    int64_t y1, uint8_t *rows, const AxisWeights &ax, int64_t out_w, bool flip) {
  const int32_t half = 1 << (kPrecisionBits - 1);
  for (int64_t y = y0; y < y1; y++) {
    const uint8_t *src = in + y * in_w * c;
    uint8_t *dst = rows + (y - y0) * out_w * c;
    if (c == 3 && HasAvx2()) {
      // pixels of this row whose 4-byte load stays inside the image
      const int64_t last_safe = y + 1 < in_h ? in_w - 1 : in_w - 2;
      HorizontalRow3Avx2(src, dst, ax, out_w, flip, last_safe);
      continue;
    }
    if (c == 3) {
      HorizontalRowC<3>(src, dst, ax, out_w, flip);
      continue;
    }
    for (int64_t x = 0; x < out_w; x++) {
      const int32_t *w = ax.weight.data() + x * ax.taps;
      uint8_t *o = dst + (flip ? out_w - 1 - x : x) * c;
      for (int64_t ch = 0; ch < c; ch++) {
        const uint8_t *p = src + static_cast<int64_t>(ax.first[x]) * c + ch;
        int32_t s = half;
        for (int t = 0; t < ax.count[x]; t++) s += static_cast<int32_t>(p[t * c]) * w[t];
        o[ch] = ClipShift(s);
      }
    }
  }
}

// Output row y = sum over taps of weight * horizontally resized row; one contiguous row of
// out_w * c values at a time, so the inner loops vectorize (8 int32 lanes with AVX2).
__attribute__((target_clones("avx2", "default")))
void VerticalPass(const uint8_t *rows, int64_t row_y0, int64_t width, uint8_t *out,
                  const AxisWeights &ay, int64_t out_h, int32_t *acc) {
  const int32_t half = 1 << (kPrecisionBits - 1);
  for (int64_t y = 0; y < out_h; y++) {
    const int32_t *w = ay.weight.data() + y * ay.taps;
    const uint8_t *base = rows + (ay.first[y] - row_y0) * width;
    for (int64_t j = 0; j < width; j++) acc[j] = half;
    for (int t = 0; t < ay.count[y]; t++) {
      const uint8_t *r = base + t * width;
      const int32_t wt = w[t];
      for (int64_t j = 0; j < width; j++) acc[j] += static_cast<int32_t>(r[j]) * wt;
    }
    uint8_t *o = out + y * width;
    for (int64_t j = 0; j < width; j++) {
      int32_t v = acc[j] >> kPrecisionBits;
      o[j] = static_cast<uint8_t>(v < 0 ? 0 : (v > 255 ? 255 : v));
    }
  }
}

}  // namespace

void ResizeAntialias(const uint8_t *in, int64_t in_h, int64_t in_w, int64_t c, uint8_t *out,
                     int64_t out_h, int64_t out_w, bool flip, ResizeScratch &scratch) {
  const AxisWeights ax = ComputeAxisWeights(in_w, out_w);
  const AxisWeights ay = ComputeAxisWeights(in_h, out_h);
  // the input rows the vertical pass reads: only those get the horizontal pass
  const int64_t y0 = ay.first[0];
  const int64_t y1 = ay.first[out_h - 1] + ay.count[out_h - 1];
  const int64_t width = out_w * c;
  scratch.rows.resize(static_cast<size_t>((y1 - y0) * width));
  scratch.acc.resize(static_cast<size_t>(width));
  HorizontalPass(in, in_h, in_w, c, y0, y1, scratch.rows.data(), ax, out_w, flip);
  VerticalPass(scratch.rows.data(), y0, width, out, ay, out_h, scratch.acc.data());
}

class ResizeCPU : public dali::StatelessOperator<dali::CPUBackend> {
 public:
  explicit ResizeCPU(const dali::OpSpec &spec)
      : dali::StatelessOperator<dali::CPUBackend>(spec),
        size_y_(spec.GetArgument<int>("size_y")),
        size_x_(spec.GetArgument<int>("size_x")),
        shorter_(spec.GetArgument<int>("resize_shorter")) {
    DALI_ENFORCE((size_y_ > 0 && size_x_ > 0) != (shorter_ > 0),
                 "DalikdResize: give either `size_y` and `size_x`, or `resize_shorter`");
  }

 protected:
  bool SetupImpl(std::vector<dali::OutputDesc> &output_desc, const dali::Workspace &ws) override {
    const auto &in = ws.Input<dali::CPUBackend>(0);
    DALI_ENFORCE(in.type() == DALI_UINT8, "DalikdResize: images must be uint8");
    DALI_ENFORCE(in.sample_dim() == 3, "DalikdResize: images must be HWC (3 dimensions)");
    const int n = in.num_samples();
    dali::TensorListShape<3> shape(n);
    for (int i = 0; i < n; i++) {
      const auto sh = in.shape().tensor_shape(i);
      DALI_ENFORCE(sh[0] > 0 && sh[1] > 0, "DalikdResize: empty image");
      int64_t h = size_y_, w = size_x_;
      if (shorter_ > 0) {  // torchvision's Resize(int): the longer side truncated
        if (sh[0] <= sh[1]) {
          h = shorter_;
          w = static_cast<int64_t>(static_cast<double>(shorter_) * sh[1] / sh[0]);
        } else {
          w = shorter_;
          h = static_cast<int64_t>(static_cast<double>(shorter_) * sh[0] / sh[1]);
        }
      }
      shape.set_tensor_shape(i, dali::TensorShape<3>{h, w, sh[2]});
    }
    output_desc.resize(1);
    output_desc[0] = {shape, DALI_UINT8};
    return true;
  }

  void RunImpl(dali::Workspace &ws) override {
    const auto &in = ws.Input<dali::CPUBackend>(0);
    auto &out = ws.Output<dali::CPUBackend>(0);
    out.SetLayout(in.GetLayout());
    const int n = in.num_samples();
    std::vector<bool> flips(n, false);
    if (spec_.HasTensorArgument("flip")) {
      const auto &f = ws.ArgumentInput("flip");
      for (int i = 0; i < n; i++) {
        DALI_ENFORCE(f.tensor_shape(i).num_elements() == 1,
                     "DalikdResize: `flip` must be one value per sample");
        switch (f.type()) {
          case DALI_INT32: flips[i] = f.tensor<int32_t>(i)[0] != 0; break;
          case DALI_UINT8: flips[i] = f.tensor<uint8_t>(i)[0] != 0; break;
          case DALI_BOOL: flips[i] = f.tensor<bool>(i)[0]; break;
          default: DALI_FAIL("DalikdResize: `flip` must be int32, uint8 or bool");
        }
      }
    } else {
      flips.assign(n, spec_.GetArgument<int>("flip") != 0);
    }
    auto &pool = ws.GetThreadPool();
    for (int i = 0; i < n; i++) {
      const auto is = in.shape().tensor_shape(i);
      const auto os = out.shape().tensor_shape(i);
      const bool flip = flips[i];
      pool.AddWork(
          [&in, &out, is, os, i, flip](int) {
            thread_local ResizeScratch scratch;  // reused across samples and batches
            ResizeAntialias(in.tensor<uint8_t>(i), is[0], is[1], is[2],
                            out.mutable_tensor<uint8_t>(i), os[0], os[1], flip, scratch);
          },
          is[0] * is[1] + os[0] * os[1]);
    }
    pool.RunAll();
  }

 private:
  int size_y_, size_x_, shorter_;
};

}  // namespace dalikd

DALI_REGISTER_OPERATOR(DalikdResize, ::dalikd::ResizeCPU, ::dali::CPU);

DALI_SCHEMA(DalikdResize)
    .DocStr(R"(dalikd's antialiased bilinear resize (Pillow's / torchvision's antialias=True
filter), with an optional horizontal flip fused in. Input and output: uint8 HWC.)")
    .NumInput(1)
    .InputLayout(0, "HWC")
    .NumOutput(1)
    .AddOptionalArg("size_y", "output height in px (with size_x)", 0)
    .AddOptionalArg("size_x", "output width in px (with size_y)", 0)
    .AddOptionalArg("resize_shorter",
                    "instead of a size: the shorter side's length; the longer side keeps the "
                    "aspect ratio, truncated as torchvision's Resize(int)",
                    0)
    .AddOptionalArg("flip", "per sample (int32, uint8 or bool): nonzero mirrors horizontally", 0,
                    true);
