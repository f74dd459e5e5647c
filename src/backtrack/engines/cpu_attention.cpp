// Cascade decode attention for CPU (see cpu_attention.py for why it is hand-written).
//
// One decode step, one layer: row r (a sample of prompt p(r); the rows of a prompt are adjacent,
// rows [starts[p], starts[p + 1])) and query head h read their prompt's keys and values (held
// once per prompt: [prompts, kv heads, prompt length, dim]; the keys dim-major) and their own
// ones ([rows, kv heads, own length, dim], any strides but the last). The softmax between the
// two kernels is torch's. The steps wait on memory more than on arithmetic (4 layers' keys and
// values outgrow the L2 cache), so each loop reads its data once, in the order it is stored.
// A prompt's padding columns [padding[p][0], padding[p][1]) are skipped: their score is the
// bias (the lowest float, what adding any score to it gives) and their weight exactly 0.
// Vectors of 8 floats (GCC/Clang vector extensions) so the compiler emits AVX2 or NEON or
// AVX-512 code as the machine allows; dim must be a multiple of 8. Keys and values are float32
// or float16 (all of one dtype); queries, scores, weights and outputs float32.

#include <torch/extension.h>

#include <algorithm>
#include <cstring>
#include <type_traits>
#if defined(__F16C__)
#include <immintrin.h>
#endif

#include "cpu_checks.h"

namespace {

using backtrack::check;
using backtrack::check_kv;

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
constexpr int64_t kBlock = 16;  // prompt tokens scored together (two vectors per query)

// The (row, query head) pairs of prompt p under kv head kh, in order: pair i of `count`.
struct Queries {
  int64_t first, count, per_kv_head;
  void at(int64_t i, int64_t kh, int64_t* row, int64_t* head) const {
    *row = (first + i) / per_kv_head;
    *head = kh * per_kv_head + (first + i) % per_kv_head;
  }
};

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

// Scores of up to kQueries queries `qs` (pointers into q, a short tail repeating the last) against
// one prompt's keys under one kv head, dim-major (token t, dim d at keys[d * ld + t]), into
// out[j][0, length): kBlock tokens at a time as two vectors per query, summed over the dims by
// multiply-adds of the query's scalars, so no horizontal sums. The blocks may read keys up to
// the next multiple of kBlock (the layout's room, `cpu_attention.dim_major`). Columns of the
// padding run [pad_from, pad_to) get the bias alone, as the model's mask gives them.
template <typename KV>
void prompt_scores(const KV* keys, int64_t ld, int64_t length, int64_t dim, const float* const* qs,
                   int64_t m, float sc, const float* b, int64_t pad_from, int64_t pad_to,
                   float* const* out) {
  for (int64_t t0 = 0; t0 < length; t0 += kBlock) {
    if (t0 >= pad_from && t0 + kBlock <= pad_to) continue;  // padding alone
    vf8 a[kQueries][2] = {};
    for (int64_t d = 0; d < dim; ++d) {
      const vf8 k0 = load8(keys + d * ld + t0), k1 = load8(keys + d * ld + t0 + 8);
      for (int64_t j = 0; j < kQueries; ++j) {
        const float x = qs[j][d];
        a[j][0] += x * k0;
        a[j][1] += x * k1;
      }
    }
    if (t0 + kBlock <= length) {
      for (int64_t j = 0; j < m; ++j) {
        store8(out[j] + t0, a[j][0] * sc + load8(b + t0));
        store8(out[j] + t0 + 8, a[j][1] * sc + load8(b + t0 + 8));
      }
      continue;
    }
    for (int64_t j = 0; j < m; ++j) {  // the last, short block
      float s[kBlock];
      store8(s, a[j][0] * sc); store8(s + 8, a[j][1] * sc);
      for (int64_t t = t0; t < length; ++t) out[j][t] = s[t - t0] + b[t];
    }
  }
  for (int64_t j = 0; j < m; ++j)
    for (int64_t t = pad_from; t < pad_to; ++t) out[j][t] = b[t];
}

// The sums of 8 vectors, as one vector (a transpose and add by AVX's horizontal adds; else
// one sum8 each).
inline vf8 sums_of8(const vf8* a) {
#if defined(__AVX__)
  const __m256 h01 = _mm256_hadd_ps(a[0], a[1]), h23 = _mm256_hadd_ps(a[2], a[3]);
  const __m256 h45 = _mm256_hadd_ps(a[4], a[5]), h67 = _mm256_hadd_ps(a[6], a[7]);
  const __m256 h03 = _mm256_hadd_ps(h01, h23), h47 = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(h03, h47, 0x20),
                       _mm256_permute2f128_ps(h03, h47, 0x31));
#else
  vf8 out;
  for (int i = 0; i < 8; ++i) out[i] = sum8(a[i]);
  return out;
#endif
}

// One query's scores against its row's own keys [from, to) (token t at keys + t * stride),
// scaled, into out[from, to): 8 tokens at a time, summed by `sums_of8`.
template <typename KV>
void own_scores(const float* q, const KV* keys, int64_t stride, int64_t from, int64_t to,
                int64_t chunks, float sc, float* out) {
  int64_t t = from;
  for (; t + 8 <= to; t += 8) {
    vf8 a[8] = {};
    for (int64_t c = 0; c < chunks; ++c) {
      const vf8 qc = load8(q + 8 * c);
      for (int i = 0; i < 8; ++i) a[i] += qc * load8(keys + (t + i) * stride + 8 * c);
    }
    store8(out + t, sums_of8(a) * sc);
  }
  for (; t < to; ++t) {
    vf8 a = {};
    for (int64_t c = 0; c < chunks; ++c) a += load8(q + 8 * c) * load8(keys + t * stride + 8 * c);
    out[t] = sum8(a) * sc;
  }
}

// Prompt keys must be dim-major with room to the next multiple of kBlock tokens (the
// kernel's reads stay within their storage).
void check_dim_major(const torch::Tensor& keys) {
  const int64_t room = (keys.size(2) + kBlock - 1) / kBlock * kBlock;
  TORCH_CHECK(keys.stride(2) == 1 && keys.stride(3) >= room && keys.stride(1) >= 0 &&
              keys.stride(0) >= 0, "prompt keys: dim-major with room for ", room,
              " tokens expected (cpu_attention.dim_major)");
  const int64_t last = keys.storage_offset() + (keys.size(0) - 1) * keys.stride(0) +
                       (keys.size(1) - 1) * keys.stride(1) + (keys.size(3) - 1) * keys.stride(3) +
                       room;
  TORCH_CHECK(last * keys.element_size() <= static_cast<int64_t>(keys.storage().nbytes()),
              "prompt keys: their room lies outside their storage");
}

// scores[r, h, :Tp] = q[r, h] . prompt_keys[p(r), kv(h), t] * scaling + bias[p(r), t]
// scores[r, h, Tp:] = q[r, h] . own_keys[r, kv(h), t] * scaling (+ own_bias[r, t] over its
// first columns: padding among a row's first own tokens, `hf_prefix.SharedPrefix.mask_own`)
template <typename KV>
torch::Tensor scores_of(torch::Tensor q, torch::Tensor prompt_keys, torch::Tensor bias,
                        torch::Tensor padding, torch::Tensor own_keys, torch::Tensor starts,
                        double scaling, c10::optional<torch::Tensor> own_bias) {
  q = q.contiguous(); bias = bias.contiguous();
  check_dim_major(prompt_keys);
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
              own_keys.size(0) == rows && prompt_keys.size(3) == dim &&
              bias.size(0) == prompts && bias.size(1) == prompt_len, "cascade_scores: shapes");
  const PromptRows layout(starts, padding, prompts, rows, prompt_len);
  auto scores = torch::empty({rows, heads, width}, q.options());
  const float* qd = q.data_ptr<float>();
  const KV* kd = prompt_keys.data_ptr<KV>();
  const KV* od = own_keys.data_ptr<KV>();
  float* sd = scores.data_ptr<float>();
  const float sc = static_cast<float>(scaling);
  for (int64_t p = 0; p < prompts; ++p) {
    const Queries queries{layout.st[p] * per_kv, (layout.st[p + 1] - layout.st[p]) * per_kv,
                          per_kv};
    for (int64_t kh = 0; kh < kv_heads; ++kh) {
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
        prompt_scores(kd + p * prompt_keys.stride(0) + kh * prompt_keys.stride(1),
                      prompt_keys.stride(3), prompt_len, dim, qs, m, sc,
                      bias.data_ptr<float>() + p * prompt_len, layout.pad[2 * p],
                      layout.pad[2 * p + 1], out);
      }
    }
  }
  const int64_t s0 = own_keys.stride(0), s1 = own_keys.stride(1), s2 = own_keys.stride(2);
  // own tokens, kTokens at a time (of a token-major cache: as many slabs)
  for (int64_t t0 = 0; t0 < own_len; t0 += kTokens)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < heads; ++h)
        own_scores(qd + (r * heads + h) * dim, od + r * s0 + (h / per_kv) * s1, s2, t0,
                   std::min(own_len, t0 + kTokens), chunks, sc,
                   sd + (r * heads + h) * width + prompt_len);
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

template <int64_t C>
using Chunks = std::integral_constant<int64_t, C>;

// Calls f(Chunks<C>{}, c0) for tiles [c0, c0 + C) of `chunks`, C at most Tile (<= 8): a
// tile's accumulators then have a size the compiler knows, and stay in registers.
template <int64_t Tile, typename F>
void by_tiles(int64_t chunks, F f) {
  static_assert(Tile >= 1 && Tile <= 8, "tiles of 1 to 8 chunks");
  for (int64_t c0 = 0; c0 < chunks; c0 += Tile) {
    switch (std::min(Tile, chunks - c0)) {
      case 1: f(Chunks<1>{}, c0); break;
      case 2: f(Chunks<2>{}, c0); break;
      case 3: f(Chunks<3>{}, c0); break;
      case 4: f(Chunks<4>{}, c0); break;
      case 5: f(Chunks<5>{}, c0); break;
      case 6: f(Chunks<6>{}, c0); break;
      case 7: f(Chunks<7>{}, c0); break;
      default: f(Chunks<8>{}, c0); break;
    }
  }
}

// Chunks per tile for kQueries queries' accumulators (kQueries x C vectors, plus the loaded
// values and weights): 32 vector registers with AVX-512, 16 with AVX2 (NEON: 32 of half
// the width).
#if defined(__AVX512F__)
constexpr int64_t kQueryTile = 5;
#else
constexpr int64_t kQueryTile = 2;
#endif
constexpr int64_t kOwnTile = 8;  // one query's

// out[j][8 c0, 8 (c0 + C)) = sum_t ws[j][t] values[t, 8 c0 : 8 (c0 + C)] over one prompt's tokens
// but its padding run, for kQueries queries (the first m stored).
template <int64_t C, typename KV>
void prompt_values_tile(const KV* values, int64_t dim, int64_t length, int64_t pad_from,
                        int64_t pad_to, const float* const* ws, int64_t m, int64_t c0,
                        float* const* dst) {
  vf8 acc[kQueries][C] = {};
  for (int64_t t = 0; t < length; ++t) {
    if (t == pad_from) t = std::max(t, pad_to);
    if (t == length) break;
    const KV* v = values + t * dim + 8 * c0;
    const float w0 = ws[0][t], w1 = ws[1][t], w2 = ws[2][t], w3 = ws[3][t];
    for (int64_t c = 0; c < C; ++c) {
      const vf8 vv = load8(v + 8 * c);
      acc[0][c] += w0 * vv; acc[1][c] += w1 * vv; acc[2][c] += w2 * vv; acc[3][c] += w3 * vv;
    }
  }
  for (int64_t j = 0; j < m; ++j)
    for (int64_t c = 0; c < C; ++c) store8(dst[j] + 8 * (c0 + c), acc[j][c]);
}

// out[8 c0, 8 (c0 + C)) += sum_t w[t] values[t, 8 c0 : 8 (c0 + C)] over one row's own tokens
// [from, to) (token t at values + t * stride).
template <int64_t C, typename KV>
void own_values_tile(const float* w, const KV* values, int64_t stride, int64_t from, int64_t to,
                     int64_t c0, float* out) {
  vf8 acc[C];
  for (int64_t c = 0; c < C; ++c) acc[c] = load8(out + 8 * (c0 + c));
  for (int64_t t = from; t < to; ++t)
    for (int64_t c = 0; c < C; ++c) acc[c] += w[t] * load8(values + t * stride + 8 * (c0 + c));
  for (int64_t c = 0; c < C; ++c) store8(out + 8 * (c0 + c), acc[c]);
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
  auto out = torch::empty({rows, heads, dim}, weights.options());
  const float* wd = weights.data_ptr<float>();
  const KV* vd = prompt_values.data_ptr<KV>();
  const KV* od = own_values.data_ptr<KV>();
  float* outd = out.data_ptr<float>();
  for (int64_t p = 0; p < prompts; ++p) {
    const Queries queries{layout.st[p] * per_kv, (layout.st[p + 1] - layout.st[p]) * per_kv,
                          per_kv};
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
        }
        by_tiles<kQueryTile>(chunks, [&](auto tile, int64_t c0) {
          prompt_values_tile<decltype(tile)::value>(values, dim, prompt_len, layout.pad[2 * p],
                                                    layout.pad[2 * p + 1], ws, m, c0, dst);
        });
      }
    }
  }
  const int64_t s0 = own_values.stride(0), s1 = own_values.stride(1), s2 = own_values.stride(2);
  // own tokens, kTokens at a time (of a token-major cache: as many slabs)
  for (int64_t t0 = 0; t0 < own_len; t0 += kTokens) {
    const int64_t t1 = std::min(own_len, t0 + kTokens);
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t h = 0; h < heads; ++h)
        by_tiles<kOwnTile>(chunks, [&](auto tile, int64_t c0) {
          own_values_tile<decltype(tile)::value>(wd + (r * heads + h) * width + prompt_len,
                                                 od + r * s0 + (h / per_kv) * s1, s2, t0, t1,
                                                 c0, outd + (r * heads + h) * dim);
        });
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

// cpu_cache.cpp: the token-major cache's writes
torch::Tensor rotary_append(torch::Tensor q, torch::Tensor k, torch::Tensor v, torch::Tensor cos,
                            torch::Tensor sin, torch::Tensor key_slab, torch::Tensor value_slab);
void compact_token_rows(torch::Tensor buffer, torch::Tensor kept, int64_t length);
// cpu_linear.cpp
torch::Tensor pack_linear(torch::Tensor weight);
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor packed, c10::optional<torch::Tensor> bias,
                            int64_t out_features);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("cascade_scores", &cascade_scores, pybind11::arg("q"), pybind11::arg("prompt_keys"),
        pybind11::arg("bias"), pybind11::arg("padding"), pybind11::arg("own_keys"),
        pybind11::arg("starts"),
        pybind11::arg("scaling"), pybind11::arg("own_bias") = pybind11::none());
  m.def("cascade_values", &cascade_values);
  m.def("compact_token_rows", &compact_token_rows);
  m.def("rotary_append", &rotary_append);
  m.def("pack_linear", &pack_linear);
  m.def("packed_linear", &packed_linear);
  m.attr("key_block") = kBlock;  // `cpu_attention.dim_major`'s room
}
