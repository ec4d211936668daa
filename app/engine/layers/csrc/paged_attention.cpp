// Attention straight from the paged KV cache, for CPU: decode rows and prefill rows alike.
//
// Each query row attends to the first ctx_len cached tokens of its sequence (a decode row: the
// whole context; a prefill row at position p: p + 1 tokens, which is causal attention, and the
// step's own K/V are written to the cache before the call), read in place through
// the block table: no gathered copy of K/V is made (on 2 cores that copy cost more than the
// attention itself). One row per task; accumulation in float32 in registers, each K/V row
// widened once and shared by the query heads of its KV head.
//
// Layouts: K [num_blocks, KVH, D, 16] (transposed within a block: q·k for 16 tokens is 16-wide
// FMAs, no horizontal sums); V [num_blocks, 16, KVH, D] (p·v accumulates along d).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec16.h"

namespace {

constexpr int64_t kBlock = 16;  // tokens per KV block (the engine's block size)
constexpr int64_t kMaxHeadDim = 256;
// exp of 16 floats at once (the softmax's exps were scalar expf calls, the kernel's largest cost):
// x = n·ln2 + r with n = round(x / ln2), |r| <= ln2 / 2, exp(r) by its Taylor series to r^7
// (relative error ~1e-7, about an ulp), times 2^n built in the exponent bits. Inputs are scores
// minus their maximum (<= 0); below -87 the result flushes to 0.
typedef int32_t i32x16 __attribute__((vector_size(64)));
inline v16 exp16(v16 x) {
  const v16 lo = v16{} - 87.0f;
  x = x < lo ? lo : x;
  const v16 y = x * 1.44269504088896341f + 0.5f;
  i32x16 n = __builtin_convertvector(y, i32x16);  // truncates toward zero
  v16 nf = __builtin_convertvector(n, v16);
  n += (y < nf);  // -1 where truncation rounded up: n = floor(y), i.e. round(x / ln2)
  nf = __builtin_convertvector(n, v16);
  const v16 r = (x - nf * 0.693359375f) - nf * -2.12194440e-4f;  // ln2 in two parts
  v16 p = v16{} + 1.9841270e-4f;  // 1/5040
  p = p * r + 1.3888889e-3f;      // 1/720
  p = p * r + 8.3333333e-3f;      // 1/120
  p = p * r + 4.1666667e-2f;      // 1/24
  p = p * r + 1.6666667e-1f;      // 1/6
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const i32x16 bits = (n + 127) << 23;
  v16 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// G: query heads per KV head, a compile-time constant so each accumulator array lives in registers.
template <typename T, int G>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           at::Tensor& out, double scale) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t kv_heads = k_cache.size(1);
  const int64_t max_blocks = block_tables.size(1);
  const int64_t v_row = kv_heads * head_dim;
  const int64_t chunks = head_dim / 16;
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  const int64_t* lp = context_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  // Rows are dealt out round-robin, not in contiguous ranges: the rows of a prefill chunk come in
  // order of growing context (causal), so contiguous ranges would hand one thread all the long ones.
  const int64_t lanes = std::min<int64_t>(batch, std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, lanes, 1, [&](int64_t lane_begin, int64_t lane_end) {
    std::vector<float> qf(num_heads * head_dim), scores;
    for (int64_t lane = lane_begin; lane < lane_end; ++lane)
    for (int64_t b = lane; b < batch; b += lanes) {
      const int64_t len = lp[b];
      const int64_t nblocks = (len + kBlock - 1) / kBlock;
      const int64_t stride = nblocks * kBlock;
      const int64_t* table = tp + b * max_blocks;
      scores.resize(num_heads * stride);
      for (int64_t i = 0; i < num_heads * head_dim; ++i)
        qf[i] = static_cast<float>(qp[b * num_heads * head_dim + i]) * fscale;

      for (int64_t h = 0; h < kv_heads; ++h) {
        const float* qh = qf.data() + h * G * head_dim;  // the G query heads of KV head h
        // scores = q · k for 16 tokens at a time: each K row is widened once and feeds G FMAs;
        // two d-chains per head keep 2G independent accumulators in flight.
        for (int64_t i = 0; i < nblocks; ++i) {
          const T* kb = kp + (table[i] * kv_heads + h) * head_dim * kBlock;
          v16 acc[G][2] = {};
          for (int64_t d = 0; d < head_dim; d += 2) {
            const v16 k0 = load16(kb + d * kBlock), k1 = load16(kb + (d + 1) * kBlock);
            for (int g = 0; g < G; ++g) {
              acc[g][0] += qh[g * head_dim + d] * k0;
              acc[g][1] += qh[g * head_dim + d + 1] * k1;
            }
          }
          for (int g = 0; g < G; ++g) {
            const v16 sum = acc[g][0] + acc[g][1];
            std::memcpy(scores.data() + (h * G + g) * stride + i * kBlock, &sum, sizeof(sum));
          }
        }
        // softmax over the first `len` scores of each of the G heads.
        for (int g = 0; g < G; ++g) {
          float* sg = scores.data() + (h * G + g) * stride;
          float mx = -INFINITY;
          for (int64_t j = 0; j < len; ++j) mx = sg[j] > mx ? sg[j] : mx;
          v16 vsum = {};
          const v16 vmx = v16{} + mx;
          int64_t j = 0;
          for (; j + 16 <= len; j += 16) {
            const v16 e = exp16(load16(sg + j) - vmx);
            std::memcpy(sg + j, &e, sizeof(e));
            vsum += e;
          }
          float sum = hsum(vsum);
          for (; j < len; ++j) { sg[j] = std::exp(sg[j] - mx); sum += sg[j]; }
          const float inv = 1.f / sum;
          for (int64_t j = 0; j < len; ++j) sg[j] *= inv;
        }
        // out = p · v, 4 chunks of 16 dims at a time: each V chunk is widened once for G heads.
        for (int64_t c0 = 0; c0 < chunks; c0 += 4) {
          const int64_t nc = chunks - c0 < 4 ? chunks - c0 : 4;
          v16 acc[G][4] = {};
          for (int64_t j = 0; j < len; ++j) {
            const T* v = vp + (table[j / kBlock] * kBlock + j % kBlock) * v_row + h * head_dim + c0 * 16;
            for (int64_t c = 0; c < nc; ++c) {
              const v16 vv = load16(v + c * 16);
              for (int g = 0; g < G; ++g) acc[g][c] += scores[(h * G + g) * stride + j] * vv;
            }
          }
          for (int g = 0; g < G; ++g) {
            T* o = op + (b * num_heads + h * G + g) * head_dim + c0 * 16;
            for (int64_t c = 0; c < nc; ++c)
              for (int u = 0; u < 16; ++u) o[c * 16 + u] = static_cast<T>(acc[g][c][u]);
          }
        }
      }
    }
  });
}

template <typename T>
void decode_attention_dispatch(int64_t group, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                               const at::Tensor& tables, const at::Tensor& lens, at::Tensor& out, double scale) {
  switch (group) {
    case 1: decode_attention_impl<T, 1>(q, k, v, tables, lens, out, scale); break;
    case 2: decode_attention_impl<T, 2>(q, k, v, tables, lens, out, scale); break;
    case 3: decode_attention_impl<T, 3>(q, k, v, tables, lens, out, scale); break;
    case 4: decode_attention_impl<T, 4>(q, k, v, tables, lens, out, scale); break;
    case 5: decode_attention_impl<T, 5>(q, k, v, tables, lens, out, scale); break;
    case 6: decode_attention_impl<T, 6>(q, k, v, tables, lens, out, scale); break;
    case 7: decode_attention_impl<T, 7>(q, k, v, tables, lens, out, scale); break;
    case 8: decode_attention_impl<T, 8>(q, k, v, tables, lens, out, scale); break;
    default: TORCH_CHECK(false, "paged_decode_attention: at most 8 query heads per KV head");
  }
}

}  // namespace

// q [B, H, D]; k_cache [num_blocks, KVH, D, 16]; v_cache [num_blocks, 16, KVH, D]; block_tables
// [B, max_blocks] int64; context_lens [B] int64 → out [B, H, D]; q and caches of one dtype.
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "dtype mismatch");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "int64 tables");
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  TORCH_CHECK(k_cache.size(3) == kBlock && v_cache.size(1) == kBlock, "the kernel needs 16-token blocks");
  TORCH_CHECK(q.size(2) % 16 == 0 && q.size(2) <= kMaxHeadDim, "head_dim must be a multiple of 16, at most 256");
  q = q.contiguous();
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  const int64_t group = q.size(1) / k_cache.size(1);
  TORCH_CHECK(group * k_cache.size(1) == q.size(1), "heads must be a multiple of KV heads");
  switch (q.scalar_type()) {
    case at::kFloat: decode_attention_dispatch<float>(group, q, k_cache, v_cache, block_tables, context_lens, out, scale); break;
    case at::kBFloat16: decode_attention_dispatch<at::BFloat16>(group, q, k_cache, v_cache, block_tables, context_lens, out, scale); break;
    case at::kHalf: decode_attention_dispatch<at::Half>(group, q, k_cache, v_cache, block_tables, context_lens, out, scale); break;
    default: TORCH_CHECK(false, "unsupported dtype");
  }
  return out;
}

// elementwise.cpp
at::Tensor rms_norm(at::Tensor x, at::Tensor weight, double eps);
void rope_(at::Tensor x, at::Tensor cos, at::Tensor sin, int64_t rot_heads);
void write_kv_(at::Tensor k_cache, at::Tensor v_cache, at::Tensor k, at::Tensor v, at::Tensor slots);
// lora_decode.cpp
void lora_decode_(at::Tensor y, at::Tensor x, at::Tensor a, at::Tensor bt, at::Tensor row_slots,
                  at::Tensor slot_cols, at::Tensor col_out, int64_t rows);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache (CPU)");
  m.def("rms_norm", &rms_norm, "RMSNorm over rows (CPU)");
  m.def("rope_", &rope_, "in-place rotary embedding of the first rot_heads heads (CPU)");
  m.def("write_kv_", &write_kv_, "the step's K/V into their paged-cache slots (CPU)");
  m.def("lora_decode_", &lora_decode_, "per-row LoRA shrink/expand of decode rows, in place (CPU)");
}
