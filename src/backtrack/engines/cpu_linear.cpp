// The decode step's linears for CPU (`cpu_linear.py` says why they are hand-written):
// y = x W^T (+ b) for a few hundred rows at most, against a weight packed once into panels of
// LANES output columns ([panels, in features, LANES], zero past the last column), so a step reads
// each weight in the order it is stored and never re-packs it (MKL's sgemm packs it at every
// call). Each output sums its products in blocks of kBlockK input features: within a block by
// fused multiply-adds in order, the blocks' sums added in order, the bias first: MKL's order
// on AVX-512 (the same floats as torch's F.linear on the Zen 4 machine from 13 rows up; MKL
// takes another path for fewer rows and may block otherwise on other CPUs: the last bits may
// differ there).

#include <torch/extension.h>

#include <algorithm>
#include <cstring>

#include "cpu_checks.h"

namespace {

using backtrack::check;

#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;  // one zmm register
#else
constexpr int64_t kLanes = 8;   // one ymm (or two NEON) registers
#endif
constexpr int64_t kBlockK = 192;
constexpr int kRows = 6;  // rows x 2 panels of accumulators: 12 vector registers

typedef float vlanes __attribute__((vector_size(kLanes * 4)));

inline vlanes load(const float* p) { vlanes v; std::memcpy(&v, p, sizeof(v)); return v; }

// Rows [0, R) of x (row stride k_all) times PANELS panels (stride panel_stride) over input
// features [k0, k1), added to y (row stride ldy, `cols` columns written) or stored in it
// (`first`, after `bias` when given).
template <int R, int PANELS>
void tile(const float* x, int64_t k_all, int64_t k0, int64_t k1, const float* panel,
          int64_t panel_stride, float* y, int64_t ldy, int64_t cols, bool first,
          const float* bias) {
  vlanes acc[R][PANELS];
  for (int r = 0; r < R; ++r)
    for (int p = 0; p < PANELS; ++p) acc[r][p] = vlanes{};
  for (int64_t k = k0; k < k1; ++k) {
    vlanes w[PANELS];
    for (int p = 0; p < PANELS; ++p) w[p] = load(panel + p * panel_stride + k * kLanes);
    for (int r = 0; r < R; ++r) {
      const float a = x[r * k_all + k];
      for (int p = 0; p < PANELS; ++p) acc[r][p] += a * w[p];
    }
  }
  for (int r = 0; r < R; ++r) {
    float sums[PANELS * kLanes];
    for (int p = 0; p < PANELS; ++p) std::memcpy(sums + p * kLanes, &acc[r][p], sizeof(vlanes));
    float* out = y + r * ldy;
    for (int64_t c = 0; c < cols; ++c)
      out[c] = first ? (bias ? bias[c] + sums[c] : sums[c]) : out[c] + sums[c];
  }
}

template <int PANELS>
void rows_tile(int64_t rows, const float* x, int64_t k_all, int64_t k0, int64_t k1,
               const float* panel, int64_t panel_stride, float* y, int64_t ldy, int64_t cols,
               bool first, const float* bias) {
  switch (rows) {
    case 1: return tile<1, PANELS>(x, k_all, k0, k1, panel, panel_stride, y, ldy, cols, first, bias);
    case 2: return tile<2, PANELS>(x, k_all, k0, k1, panel, panel_stride, y, ldy, cols, first, bias);
    case 3: return tile<3, PANELS>(x, k_all, k0, k1, panel, panel_stride, y, ldy, cols, first, bias);
    case 4: return tile<4, PANELS>(x, k_all, k0, k1, panel, panel_stride, y, ldy, cols, first, bias);
    case 5: return tile<5, PANELS>(x, k_all, k0, k1, panel, panel_stride, y, ldy, cols, first, bias);
    default: return tile<kRows, PANELS>(x, k_all, k0, k1, panel, panel_stride, y, ldy, cols, first, bias);
  }
}

}  // namespace

torch::Tensor pack_linear(torch::Tensor weight) {
  check(weight, 2, "pack_linear: weight");
  const auto w = weight.contiguous();
  const int64_t n_out = w.size(0), n_in = w.size(1), panels = (n_out + kLanes - 1) / kLanes;
  auto packed = torch::zeros({panels, n_in, kLanes}, w.options());
  const float* from = w.data_ptr<float>();
  float* to = packed.data_ptr<float>();
  for (int64_t n = 0; n < n_out; ++n)
    for (int64_t k = 0; k < n_in; ++k)
      to[((n / kLanes) * n_in + k) * kLanes + n % kLanes] = from[n * n_in + k];
  return packed;
}

torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                            int64_t out_features) {
  check(x, 2, "packed_linear: x");
  check(packed, 3, "packed_linear: packed");
  const int64_t rows = x.size(0), k_all = x.size(1);
  TORCH_CHECK(x.is_contiguous() && packed.is_contiguous() && packed.size(1) == k_all &&
                  packed.size(2) == kLanes && packed.size(0) * kLanes >= out_features,
              "packed_linear: a contiguous x [rows, in] and its weight from pack_linear expected");
  const float* b = nullptr;
  if (bias.has_value()) {
    check(*bias, 1, "packed_linear: bias");
    TORCH_CHECK(bias->is_contiguous() && bias->size(0) == out_features, "packed_linear: bias");
    b = bias->data_ptr<float>();
  }
  auto y = torch::empty({rows, out_features}, x.options());
  const float* xs = x.data_ptr<float>();
  const float* ws = packed.data_ptr<float>();
  float* ys = y.data_ptr<float>();
  const int64_t panels = packed.size(0), panel_stride = k_all * kLanes;
  for (int64_t p = 0; p < panels; p += 2) {
    const int64_t two = std::min<int64_t>(2, panels - p);
    const int64_t cols = std::min<int64_t>(two * kLanes, out_features - p * kLanes);
    const float* panel = ws + p * panel_stride;
    const float* panel_bias = b ? b + p * kLanes : nullptr;
    for (int64_t k0 = 0; k0 < k_all; k0 += kBlockK) {
      const int64_t k1 = std::min(k_all, k0 + kBlockK);
      for (int64_t r = 0; r < rows; r += kRows) {
        const int64_t n = std::min<int64_t>(kRows, rows - r);
        float* out = ys + r * out_features + p * kLanes;
        if (two == 2)
          rows_tile<2>(n, xs + r * k_all, k_all, k0, k1, panel, panel_stride, out, out_features,
                       cols, k0 == 0, panel_bias);
        else
          rows_tile<1>(n, xs + r * k_all, k_all, k0, k1, panel, panel_stride, out, out_features,
                       cols, k0 == 0, panel_bias);
      }
    }
  }
  return y;
}
