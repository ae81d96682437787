// dalikd's antialiased resize (CPU): the filter of Pillow's and torchvision's
// resize(antialias=True) for bilinear, with an optional horizontal flip fused into it.
//
// The filter is a triangle whose support widens with the downscale factor: output pixel i of an
// axis of `in` -> `out` pixels has its centre at (i + 0.5) * scale in input coordinates
// (scale = in / out), support = max(scale, 1) input pixels either side, and the weights
// tri((x - centre + 0.5) / max(scale, 1)) over the input pixels x it covers, normalized to sum
// to 1. Weights are computed once per output row and column, in double, then turned into fixed
// point with kPrecisionBits fraction bits (rounded half away from zero), as Pillow does.
//
// The resize is separable: horizontal first (only over the input rows the vertical pass reads),
// rounded to uint8, then vertical, as Pillow and torch's uint8 kernel do. A flipped sample
// writes output column x to out_w - 1 - x in the horizontal pass; the vertical pass treats
// columns independently, so this is exactly flip(resize(x)).
#ifndef DALIKD_NATIVE_RESIZE_H_
#define DALIKD_NATIVE_RESIZE_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace dalikd {

// 8 bits of pixel + 22 of weight + sign + headroom fit an int32 accumulator: the weights are
// non-negative and sum to 1 << 22 (up to rounding), so a sum is < 256 << 22 < 2^31.
constexpr int kPrecisionBits = 22;

// The fixed-point weights of one axis: output i reads input [first[i], first[i] + count[i])
// with weights weight[i * taps .. i * taps + count[i]).
struct AxisWeights {
  int taps = 0;
  std::vector<int32_t> first, count, weight;
};

inline AxisWeights ComputeAxisWeights(int64_t in, int64_t out) {
  const double scale = static_cast<double>(in) / static_cast<double>(out);
  const double filter_scale = std::max(scale, 1.0);
  const double support = filter_scale;  // the triangle's support is 1 at scale 1
  AxisWeights a;
  a.taps = static_cast<int>(std::ceil(support)) * 2 + 1;
  a.first.resize(out);
  a.count.resize(out);
  a.weight.assign(static_cast<size_t>(out) * a.taps, 0);
  std::vector<double> k(a.taps);
  for (int64_t i = 0; i < out; i++) {
    const double centre = (static_cast<double>(i) + 0.5) * scale;
    // truncation toward zero, as Pillow's and torch's (int) casts
    const int64_t lo = std::max<int64_t>(static_cast<int64_t>(centre - support + 0.5), 0);
    const int64_t hi = std::min<int64_t>(static_cast<int64_t>(centre + support + 0.5), in);
    const int64_t n = std::min<int64_t>(hi - lo, a.taps);
    double total = 0.0;
    for (int64_t x = 0; x < n; x++) {
      const double t = std::abs((static_cast<double>(x + lo) - centre + 0.5) / filter_scale);
      k[x] = t < 1.0 ? 1.0 - t : 0.0;
      total += k[x];
    }
    int32_t *w = a.weight.data() + i * a.taps;
    for (int64_t x = 0; x < n; x++) {
      const double v = (total != 0.0 ? k[x] / total : 0.0) * (1 << kPrecisionBits);
      w[x] = static_cast<int32_t>(v < 0 ? std::trunc(v - 0.5) : std::trunc(v + 0.5));
    }
    a.first[i] = static_cast<int32_t>(lo);
    a.count[i] = static_cast<int32_t>(n);
  }
  return a;
}

inline uint8_t ClipShift(int32_t acc) {
  acc >>= kPrecisionBits;
  return static_cast<uint8_t>(acc < 0 ? 0 : (acc > 255 ? 255 : acc));
}

// Scratch of one resize: the horizontal pass's rows and the vertical pass's accumulators.
struct ResizeScratch {
  std::vector<uint8_t> rows;
  std::vector<int32_t> acc;
};

// in: uint8 HWC (in_h, in_w, c), contiguous. out: uint8 HWC (out_h, out_w, c).
void ResizeAntialias(const uint8_t *in, int64_t in_h, int64_t in_w, int64_t c, uint8_t *out,
                     int64_t out_h, int64_t out_w, bool flip, ResizeScratch &scratch);

}  // namespace dalikd

#endif  // DALIKD_NATIVE_RESIZE_H_
