// 16-float vectors for the CPU kernels (one AVX-512 register, two AVX2 ones elsewhere), via
// GCC/Clang vector extensions, and loads that widen bf16/fp16 to them.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

typedef float v16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));

inline v16 load16(const float* p) { v16 v; std::memcpy(&v, p, sizeof(v)); return v; }
// bf16 is the top half of a float32: widening is a shift.
inline v16 load16(const at::BFloat16* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof(h));
  u32x16 w = __builtin_convertvector(h, u32x16) << 16;
  v16 v;
  std::memcpy(&v, &w, sizeof(v));
  return v;
}
inline v16 load16(const at::Half* p) {
  float f[16];
  for (int i = 0; i < 16; ++i) f[i] = static_cast<float>(p[i]);
  return load16(f);
}
inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v[i];
  return s;
}
