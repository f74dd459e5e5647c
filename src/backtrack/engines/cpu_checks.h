// Input checks shared by the C++ kernels of the hf engine (`cpu_attention.cpp`, `cpu_cache.cpp`).

#pragma once

#include <torch/extension.h>

namespace backtrack {

inline void check(const torch::Tensor& t, int64_t dims, const char* name,
           torch::ScalarType dtype = torch::kFloat32) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == dtype && t.dim() == dims,
              name, ": a ", c10::toString(dtype), " CPU tensor of ", dims, " dims expected");
}

// Keys and values: float32, or float16 for both the prompts' and the rows' own.
inline void check_kv(const torch::Tensor& prompt, const torch::Tensor& own, const char* name) {
  const auto dtype = prompt.scalar_type();
  TORCH_CHECK(dtype == torch::kFloat32 || dtype == torch::kHalf, name,
              ": float32 or float16 keys and values expected");
  check(prompt, 4, name, dtype);
  check(own, 4, name, dtype);  // the same dtype as the prompts'
}

}  // namespace backtrack
