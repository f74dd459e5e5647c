// Cascade decode attention for CPU (see cpu_attention.py for why it is hand-written).
//
// One decode step, one layer: row r (a sample of prompt p(r); the rows of a prompt are adjacent,
// rows [starts[p], starts[p + 1])) and query head h read their prompt's keys and values (held
// once per prompt: [prompts, kv heads, prompt length, dim]) and their own ones ([rows, kv heads,
// own length, dim], any strides but the last). The softmax between the two kernels is torch's.
// A prompt's padding columns [padding[p][0], padding[p][1]) are skipped: their score is the
// bias (the lowest float, what adding any score to it gives) and their weight exactly 0.
// Vectors of 8 floats (GCC/Clang vector extensions) so the compiler emits AVX2 or NEON or
// AVX-512 code as the machine allows; dim must be a multiple of 8. Keys and values are float32
// or float16 (all of one dtype); queries, scores, weights and outputs float32.

#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
#endif

namespace {

typedef float vf8 __attribute__((vector_size(32)));

inline vf8 load8(const float* p) { vf8 v; std::memcpy(&v, p, sizeof(v)); return v; }
// Keys and values may be stored as float16 (`kv_cache_dtype`): 8 of them widened to floats, by
// F16C's vcvtph2ps where the CPU has it (GCC 12 converts a _Float16 vector element by element).
inline vf8 load8(const at::Half* p) {
#if defined(__F16C__)
  const __m256 wide = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  vf8 v; std::memcpy(&v, &wide, sizeof(v)); return v;
#else
  vf8 v;
  for (int i = 0; i < 8; ++i) v[i] = static_cast<float>(p[i]);
  return v;
#endif
}
inline void store8(float* p, vf8 v) { std::memcpy(p, &v, sizeof(v)); }
inline float sum8(vf8 v) {
  return ((v[0] + v[4]) + (v[1] + v[5])) + ((v[2] + v[6]) + (v[3] + v[7]));
}

constexpr int64_t kQueries = 4;  // queries of one prompt and kv head sharing each key load
constexpr int64_t kMaxChunks = 32;  // dim <= 256
constexpr int64_t kTokens = 16;  // a token-major cache's tokens read together (16 streams)

// The (row, query head) pairs of prompt p under kv head kh, in order: pair i of `count`.
struct Queries {
  int64_t first, count, per_kv_head;
  void at(int64_t i, int64_t kh, int64_t* row, int64_t* head) const {
    *row = (first + i) / per_kv_head;
    *head = kh * per_kv_head + (first + i) % per_kv_head;
  }
};

void check(const torch::Tensor& t, int64_t dims, const char* name,
           torch::ScalarType dtype = torch::kFloat32) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dims,
              name, ": a ", c10::toString(dtype), " CPU tensor of ", dims, " dims expected");
}

// Keys and values: float32, or float16 for both the prompts' and the rows' own.
void check_kv(const torch::Tensor& prompt, const torch::Tensor& own, const char* name) {
  const auto dtype = prompt.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kHalf, name,
              ": float32 or float16 keys and values expected");
  check(prompt, 4, name, dtype);
  check(own, 4, name, dtype);  // the same dtype as the prompts'
}

// Each prompt's rows [st[p], st[p + 1]) and padding run [pad[2p], pad[2p + 1]), as int64 and
// checked against the batch: rows ascending over [0, rows), runs within the prompt.
struct PromptRows {
  torch::Tensor starts, padding;
  const int64_t* st;
  const int64_t* pad;
  PromptRows(const torch::Tensor& starts_in, const torch::Tensor& padding_in, int64_t prompts,
             int64_t rows, int64_t prompt_len)
      : starts(starts_in.to(torch::kInt64).contiguous()),
        padding(padding_in.to(torch::kInt64).contiguous()) {
    TORCH_CHECK(starts.numel() == prompts + 1 && padding.numel() == 2 * prompts,
                "starts / padding: one entry per prompt expected");
    st = starts.data_ptr<int64_t>();
    pad = padding.data_ptr<int64_t>();
    TORCH_CHECK(st[0] == 0 && st[prompts] == rows, "starts: must span the rows");
    for (int64_t p = 0; p < prompts; ++p)
      TORCH_CHECK(st[p] <= st[p + 1] && 0 <= pad[2 * p] && pad[2 * p] <= pad[2 * p + 1] &&
                  pad[2 * p + 1] <= prompt_len, "starts / padding: out of range");
  }
};

}  // namespace

// scores[r, h, :Tp] = q[r, h] . prompt_keys[p(r), kv(h), t] * scaling + bias[p(r), t]
// scores[r, h, Tp:] = q[r, h] . own_keys[r, kv(h), t] * scaling (+ own_bias[r, t] over its
// first columns: padding among a row's first own tokens, `hf_prefix.SharedPrefix.mask_own`)
template <typename KV>
torch::Tensor scores_of(torch::Tensor q, torch::Tensor prompt_keys, torch::Tensor bias,
                        torch::Tensor padding, torch::Tensor own_keys, torch::Tensor starts,
                        double scaling, c10::optional<torch::Tensor> own_bias) {
  q = q.contiguous(); prompt_keys = prompt_keys.contiguous(); bias = bias.contiguous();
  torch::Tensor own = own_bias.has_value() ? own_bias->contiguous() : torch::Tensor();
  if (own.defined()) {
    check(own, 2, "own_bias");
    TORCH_CHECK(own.size(0) == q.size(0) && own.size(1) <= own_keys.size(2), "own_bias: shape");
  }
  const int64_t rows = q.size(0), heads = q.size(1), dim = q.size(2);
  const int64_t prompts = prompt_keys.size(0), kv_heads = prompt_keys.size(1);
  const int64_t prompt_len = prompt_keys.size(2), own_len = own_keys.size(2);
  const int64_t per_kv = heads / kv_heads, chunks = dim / 8, width = prompt_len + own_len;
  TORCH_CHECK(dim % 8 == 0 && dim / 8 <= kMaxChunks && own_keys.stride(3) == 1 &&
              own_keys.size(0) == rows && bias.size(0) == prompts &&
              bias.size(1) == prompt_len, "cascade_scores: shapes");
  const PromptRows layout(starts, padding, prompts, rows, prompt_len);
  const int64_t* st = layout.st;
  const int64_t* pad = layout.pad;
  auto scores = torch::empty({rows, heads, width}, q.options());
  const float* qd = q.data_ptr<float>();
  const KV* kd = prompt_keys.data_ptr<KV>();
  const float* bd = bias.data_ptr<float>();
  const KV* od = own_keys.data_ptr<KV>();
  float* sd = scores.data_ptr<float>();
  const float sc = static_cast<float>(scaling);
  for (int64_t p = 0; p < prompts; ++p) {
    const Queries queries{st[p] * per_kv, (st[p + 1] - st[p]) * per_kv, per_kv};
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
      const KV* keys = kd + (p * kv_heads + kh) * prompt_len * dim;
      const float* b = bd + p * prompt_len;
      for (int64_t i0 = 0; i0 < queries.count; i0 += kQueries) {
        const int64_t m = std::min(kQueries, queries.count - i0);
        const float* qs[kQueries];
        float* out[kQueries];
        for (int64_t j = 0; j < kQueries; ++j) {  // short tail: repeat the last query
          int64_t r, h;
          queries.at(i0 + std::min(j, m - 1), kh, &r, &h);
          qs[j] = qd + (r * heads + h) * dim;
          out[j] = sd + (r * heads + h) * width;
        }
        for (int64_t t = pad[2 * p]; t < pad[2 * p + 1]; ++t)
          for (int64_t j = 0; j < m; ++j) out[j][t] = b[t];
        for (int64_t t = 0; t < prompt_len; ++t) {
          if (t == pad[2 * p]) t = std::max(t, pad[2 * p + 1]);
          if (t == prompt_len) break;
          const KV* k = keys + t * dim;
          vf8 a0 = {}, a1 = {}, a2 = {}, a3 = {};
          for (int64_t c = 0; c < chunks; ++c) {
            const vf8 kv = load8(k + 8 * c);
            a0 += load8(qs[0] + 8 * c) * kv; a1 += load8(qs[1] + 8 * c) * kv;
            a2 += load8(qs[2] + 8 * c) * kv; a3 += load8(qs[3] + 8 * c) * kv;
          }
          const float a[kQueries] = {sum8(a0), sum8(a1), sum8(a2), sum8(a3)};
          for (int64_t j = 0; j < m; ++j) out[j][t] = a[j] * sc + b[t];
        }
      }
    }
  }
  const int64_t s0 = own_keys.stride(0), s1 = own_keys.stride(1), s2 = own_keys.stride(2);
  // own tokens, kTokens at a time (of a token-major cache: as many slabs)
  for (int64_t t0 = 0; t0 < own_len; t0 += kTokens) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* qq = qd + (r * heads + h) * dim;
        const KV* keys = od + r * s0 + (h / per_kv) * s1;
        float* out = sd + (r * heads + h) * width + prompt_len;
        for (int64_t t = t0; t < std::min(own_len, t0 + kTokens); ++t) {
          vf8 a = {};
          for (int64_t c = 0; c < chunks; ++c)
            a += load8(qq + 8 * c) * load8(keys + t * s2 + 8 * c);
          out[t] = sum8(a) * sc;
        }
      }
    }
  }
  const int64_t biased = own.defined() ? own.size(1) : 0;
  const float* ob = own.defined() ? own.data_ptr<float>() : nullptr;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t t = 0; t < biased; ++t)
        sd[(r * heads + h) * width + prompt_len + t] += ob[r * biased + t];
  return scores;
}

torch::Tensor cascade_scores(torch::Tensor q, torch::Tensor prompt_keys, torch::Tensor bias,
                             torch::Tensor padding, torch::Tensor own_keys, torch::Tensor starts,
                             double scaling, c10::optional<torch::Tensor> own_bias) {
  check(q, 3, "q"); check(bias, 2, "bias"); check_kv(prompt_keys, own_keys, "keys");
  if (prompt_keys.scalar_type() == torch::kHalf)
    return scores_of<at::Half>(q, prompt_keys, bias, padding, own_keys, starts, scaling,
                               own_bias);
  return scores_of<float>(q, prompt_keys, bias, padding, own_keys, starts, scaling, own_bias);
}

// out[r, h] = sum_t w[r, h, t] prompt_values[p(r), kv(h), t]
//           + sum_t w[r, h, Tp + t] own_values[r, kv(h), t]
template <typename KV>
torch::Tensor values_of(torch::Tensor weights, torch::Tensor prompt_values,
                        torch::Tensor padding, torch::Tensor own_values, torch::Tensor starts) {
  weights = weights.contiguous(); prompt_values = prompt_values.contiguous();
  const int64_t rows = weights.size(0), heads = weights.size(1), width = weights.size(2);
  const int64_t prompts = prompt_values.size(0), kv_heads = prompt_values.size(1);
  const int64_t prompt_len = prompt_values.size(2), dim = prompt_values.size(3);
  const int64_t own_len = own_values.size(2), per_kv = heads / kv_heads, chunks = dim / 8;
  TORCH_CHECK(dim % 8 == 0 && chunks <= kMaxChunks && own_values.stride(3) == 1 &&
              own_values.size(0) == rows && width == prompt_len + own_len,
              "cascade_values: shapes");
  const PromptRows layout(starts, padding, prompts, rows, prompt_len);
  const int64_t* st = layout.st;
  const int64_t* pad = layout.pad;
  auto out = torch::empty({rows, heads, dim}, weights.options());
  const float* wd = weights.data_ptr<float>();
  const KV* vd = prompt_values.data_ptr<KV>();
  const KV* od = own_values.data_ptr<KV>();
  float* outd = out.data_ptr<float>();
  const int64_t s0 = own_values.stride(0), s1 = own_values.stride(1), s2 = own_values.stride(2);
  vf8 acc[kQueries][kMaxChunks];
  for (int64_t p = 0; p < prompts; ++p) {
    const Queries queries{st[p] * per_kv, (st[p + 1] - st[p]) * per_kv, per_kv};
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
      const KV* values = vd + (p * kv_heads + kh) * prompt_len * dim;
      for (int64_t i0 = 0; i0 < queries.count; i0 += kQueries) {
        const int64_t m = std::min(kQueries, queries.count - i0);
        const float* ws[kQueries];
        float* dst[kQueries];
        for (int64_t j = 0; j < kQueries; ++j) {
          int64_t r, h;
          queries.at(i0 + std::min(j, m - 1), kh, &r, &h);
          ws[j] = wd + (r * heads + h) * width;
          dst[j] = outd + (r * heads + h) * dim;
          for (int64_t c = 0; c < chunks; ++c) acc[j][c] = vf8{};
        }
        for (int64_t t = 0; t < prompt_len; ++t) {
          if (t == pad[2 * p]) t = std::max(t, pad[2 * p + 1]);
          if (t == prompt_len) break;
          const KV* v = values + t * dim;
          const float w0 = ws[0][t], w1 = ws[1][t], w2 = ws[2][t], w3 = ws[3][t];
          for (int64_t c = 0; c < chunks; ++c) {
            const vf8 vv = load8(v + 8 * c);
            acc[0][c] += w0 * vv; acc[1][c] += w1 * vv; acc[2][c] += w2 * vv; acc[3][c] += w3 * vv;
          }
        }
        for (int64_t j = 0; j < m; ++j)
          for (int64_t c = 0; c < chunks; ++c) store8(dst[j] + 8 * c, acc[j][c]);
      }
    }
  }
  // own tokens, kTokens at a time (of a token-major cache: as many slabs)
  for (int64_t t0 = 0; t0 < own_len; t0 += kTokens) {
    for (int64_t r = 0; r < rows; ++r) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* w = wd + (r * heads + h) * width + prompt_len;
        float* o = outd + (r * heads + h) * dim;
        for (int64_t c = 0; c < chunks; ++c) acc[0][c] = load8(o + 8 * c);
        for (int64_t t = t0; t < std::min(own_len, t0 + kTokens); ++t) {
          const KV* v = od + r * s0 + (h / per_kv) * s1 + t * s2;
          for (int64_t c = 0; c < chunks; ++c) acc[0][c] += w[t] * load8(v + 8 * c);
        }
        for (int64_t c = 0; c < chunks; ++c) store8(o + 8 * c, acc[0][c]);
      }
    }
  }
  return out;
}

torch::Tensor cascade_values(torch::Tensor weights, torch::Tensor prompt_values,
                             torch::Tensor padding, torch::Tensor own_values,
                             torch::Tensor starts) {
  check(weights, 3, "weights"); check_kv(prompt_values, own_values, "values");
  if (prompt_values.scalar_type() == torch::kHalf)
    return values_of<at::Half>(weights, prompt_values, padding, own_values, starts);
  return values_of<float>(weights, prompt_values, padding, own_values, starts);
}

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

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cascade_scores", &cascade_scores, pybind11::arg("q"), pybind11::arg("prompt_keys"),
        pybind11::arg("bias"), pybind11::arg("padding"), pybind11::arg("own_keys"),
        pybind11::arg("starts"),
        pybind11::arg("scaling"), pybind11::arg("own_bias") = pybind11::none());
  m.def("cascade_values", &cascade_values);
  m.def("compact_token_rows", &compact_token_rows);
  m.def("rotary_append", &rotary_append);
}
