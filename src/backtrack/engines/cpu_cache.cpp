// The token-major own-token cache's writes for the hf engine's `cpu_kernel`
// (`cpu_attention.TokenMajorLayer`): a decode step's rotary embedding and cache write in one
// call, and finished rows dropped in place. Bound into the module by cpu_attention.cpp.

#include <torch/extension.h>

#include <cstring>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "cpu_checks.h"

using backtrack::check;
using backtrack::check_kv;

namespace {

// One decode step's rotary embedding and cache write (`TokenMajorLayer.append_rotated`):
// transformers' apply_rotary_pos_emb on q [rows, heads * dim] and k [rows, kv heads * dim]
// with cos, sin [rows, dim]: x * cos + rotate_half(x) * sin, rotate_half(x)[i] = -x[i + dim/2]
// below dim/2 and x[i - dim/2] above. The rotated keys and the values v are written into this
// token's slabs of the cache ([rows, kv heads, dim], float32 or float16, rounded to nearest even
// as torch's copy does); the rotated queries are returned ([rows, heads, dim]). Each product is
// rounded before the sum, as torch's separate multiplications and addition round them: no fused
// multiply-add, so the same floats as transformers' rotary.
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("fp-contract=off")))
#endif
void rotate_rows(const float* x, const float* cos, const float* sin, int64_t heads, int64_t dim,
                 float* out) {
#if defined(__clang__)
#pragma clang fp contract(off)
#endif
  const int64_t half = dim / 2;
  for (int64_t h = 0; h < heads; ++h) {
    const float* xh = x + h * dim;
    float* oh = out + h * dim;
    for (int64_t i = 0; i < half; ++i) {
      const float direct = xh[i] * cos[i], turned = -xh[i + half] * sin[i];
      oh[i] = direct + turned;
    }
    for (int64_t i = half; i < dim; ++i) {
      const float direct = xh[i] * cos[i], turned = xh[i - half] * sin[i];
      oh[i] = direct + turned;
    }
  }
}

void store_row(const float* from, int64_t count, float* to) {
  std::memcpy(to, from, count * sizeof(float));
}

// float32 -> float16, rounded to nearest even (torch's copy): 8 at a time by F16C's vcvtps2ph
// where the CPU has it (c10::Half's conversion is a scalar bit manipulation).
void store_row(const float* from, int64_t count, at::Half* to) {
  int64_t i = 0;
#if defined(__F16C__)
  for (; i + 8 <= count; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < count; ++i) to[i] = static_cast<at::Half>(from[i]);
}

}  // namespace

torch::Tensor rotary_append(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                            torch::Tensor sin, torch::Tensor key_slab, torch::Tensor value_slab) {
  for (const auto* t : {&q, &k, &v, &cos, &sin}) check(*t, 2, "rotary_append: q, k, v, cos, sin");
  check_kv(key_slab.unsqueeze(0), value_slab.unsqueeze(0), "rotary_append: slabs");
  const int64_t rows = q.size(0), dim = cos.size(1), kv_heads = key_slab.size(1);
  TORCH_CHECK(dim % 2 == 0 && q.size(1) % dim == 0 && k.sizes() == v.sizes() &&
              k.size(1) == kv_heads * dim && key_slab.size(2) == dim &&
              key_slab.sizes() == value_slab.sizes() && key_slab.size(0) == rows &&
              k.size(0) == rows && cos.sizes() == sin.sizes() && cos.size(0) == rows &&
              q.is_contiguous() && k.is_contiguous() && v.is_contiguous() &&
              cos.is_contiguous() && sin.is_contiguous() && key_slab.is_contiguous() &&
              value_slab.is_contiguous(), "rotary_append: shapes");
  const int64_t heads = q.size(1) / dim;
  auto rotated = torch::empty({rows, heads, dim}, q.options());
  const float *qd = q.data_ptr<float>(), *kd = k.data_ptr<float>(), *vd = v.data_ptr<float>();
  const float *cd = cos.data_ptr<float>(), *sd = sin.data_ptr<float>();
  float* out = rotated.data_ptr<float>();
  const int64_t width = kv_heads * dim;
  std::vector<float> keys(rows * width);
  for (int64_t r = 0; r < rows; ++r) {
    rotate_rows(qd + r * heads * dim, cd + r * dim, sd + r * dim, heads, dim,
                out + r * heads * dim);
    rotate_rows(kd + r * width, cd + r * dim, sd + r * dim, kv_heads, dim,
                keys.data() + r * width);
  }
  if (key_slab.scalar_type() == torch::kHalf) {
    store_row(keys.data(), rows * width, key_slab.data_ptr<at::Half>());
    store_row(vd, rows * width, value_slab.data_ptr<at::Half>());
  } else {
    store_row(keys.data(), rows * width, key_slab.data_ptr<float>());
    store_row(vd, rows * width, value_slab.data_ptr<float>());
  }
  return rotated;
}

// Rows `kept` (ascending) of a token-major [room, rows, heads, dim] buffer (`TokenMajorLayer`)
// moved to the front of each of its first `length` tokens' slabs, in place: one copy of each
// kept row (index-then-assign makes two).
void compact_token_rows(torch::Tensor buffer, torch::Tensor kept, int64_t length) {
  TORCH_CHECK(buffer.device().is_cpu() && buffer.dim() == 4 && buffer.stride(3) == 1 &&
              buffer.stride(2) == buffer.size(3) &&
              buffer.stride(1) == buffer.size(2) * buffer.size(3),
              "compact_token_rows: a [room, rows, heads, dim] buffer");
  kept = kept.to(torch::kInt64).contiguous();
  const int64_t* kd = kept.data_ptr<int64_t>();
  const int64_t row = buffer.stride(1) * buffer.element_size();
  const int64_t slab = buffer.stride(0) * buffer.element_size();
  for (int64_t i = 0; i < kept.numel(); ++i)
    TORCH_CHECK(kd[i] >= i && kd[i] < buffer.size(1) && (i == 0 || kd[i] > kd[i - 1]),
                "compact_token_rows: kept rows must ascend");
  char* base = static_cast<char*>(buffer.data_ptr());
  for (int64_t t = 0; t < length; ++t)
    for (int64_t i = 0; i < kept.numel(); ++i)
      if (kd[i] != i) std::memmove(base + t * slab + i * row, base + t * slab + kd[i] * row, row);
}
