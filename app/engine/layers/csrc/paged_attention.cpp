// Decode attention straight from the paged KV cache, for CPU.
//
// One query token per sequence attends to its first ctx_len cached tokens, read in place through
// the block table: no gathered copy of K/V is ever made (on 2 cores that copy cost more than the
// attention itself). Work is split over (sequence, KV head); the query heads that share a KV head
// are processed together so each K/V row is read once. Accumulation is in float32.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <vector>

namespace {

inline void load_row(const float* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = src[d];
}
// bf16 is the top half of a float32: widening is a shift, which vectorizes well.
inline void load_row(const at::BFloat16* src, float* dst, int64_t n) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
  uint32_t* d32 = reinterpret_cast<uint32_t*>(dst);
  for (int64_t d = 0; d < n; ++d) d32[d] = static_cast<uint32_t>(s[d]) << 16;
}
inline void load_row(const at::Half* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

template <typename T>
void decode_attention_impl(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                           const at::Tensor& block_tables, const at::Tensor& context_lens,
                           at::Tensor& out, double scale) {
  const int64_t batch = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t block_size = k_cache.size(1), kv_heads = k_cache.size(2);
  const int64_t group = num_heads / kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const int64_t row = kv_heads * head_dim;  // one token's K (or V) for all KV heads, contiguous
  const T* qp = q.data_ptr<T>();
  const T* kp = k_cache.data_ptr<T>();
  const T* vp = v_cache.data_ptr<T>();
  const int64_t* tp = block_tables.data_ptr<int64_t>();
  const int64_t* lp = context_lens.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const float fscale = static_cast<float>(scale);

  // One task per sequence: its blocks are read front to back, each token's row once.
  at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(num_heads * head_dim), acc(num_heads * head_dim), rowf(row), scores;
    for (int64_t b = begin; b < end; ++b) {
      const int64_t len = lp[b];
      scores.assign(num_heads * len, 0.f);
      load_row(qp + b * num_heads * head_dim, qf.data(), num_heads * head_dim);
      for (auto& x : qf) x *= fscale;
      for (int64_t j = 0; j < len; ++j) {
        const int64_t blk = tp[b * max_blocks + j / block_size];
        load_row(kp + (blk * block_size + j % block_size) * row, rowf.data(), row);
        for (int64_t hq = 0; hq < num_heads; ++hq) {
          const float* k = rowf.data() + (hq / group) * head_dim;
          const float* qh = qf.data() + hq * head_dim;
          float s = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) s += qh[d] * k[d];
          scores[hq * len + j] = s;
        }
      }
      for (int64_t hq = 0; hq < num_heads; ++hq) {
        float* sg = scores.data() + hq * len;
        float mx = -INFINITY;
        for (int64_t j = 0; j < len; ++j) mx = sg[j] > mx ? sg[j] : mx;
        float sum = 0.f;
        for (int64_t j = 0; j < len; ++j) { sg[j] = std::exp(sg[j] - mx); sum += sg[j]; }
        const float inv = 1.f / sum;
        for (int64_t j = 0; j < len; ++j) sg[j] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t j = 0; j < len; ++j) {
        const int64_t blk = tp[b * max_blocks + j / block_size];
        load_row(vp + (blk * block_size + j % block_size) * row, rowf.data(), row);
        for (int64_t hq = 0; hq < num_heads; ++hq) {
          const float p = scores[hq * len + j];
          const float* v = rowf.data() + (hq / group) * head_dim;
          float* a = acc.data() + hq * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * v[d];
        }
      }
      T* o = op + b * num_heads * head_dim;
      for (int64_t i = 0; i < num_heads * head_dim; ++i) o[i] = static_cast<T>(acc[i]);
    }
  });
}

}  // namespace

// q [B, H, D]; caches [num_blocks, block_size, KVH, D]; block_tables [B, max_blocks] int64;
// context_lens [B] int64 → out [B, H, D], all contiguous, q and caches of one dtype.
at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor context_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && v_cache.dim() == 4, "bad ranks");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), "dtype mismatch");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && context_lens.scalar_type() == at::kLong, "int64 tables");
  q = q.contiguous();
  TORCH_CHECK(k_cache.is_contiguous() && v_cache.is_contiguous(), "caches must be contiguous");
  block_tables = block_tables.contiguous();
  context_lens = context_lens.contiguous();
  auto out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat: decode_attention_impl<float>(q, k_cache, v_cache, block_tables, context_lens, out, scale); break;
    case at::kBFloat16: decode_attention_impl<at::BFloat16>(q, k_cache, v_cache, block_tables, context_lens, out, scale); break;
    case at::kHalf: decode_attention_impl<at::Half>(q, k_cache, v_cache, block_tables, context_lens, out, scale); break;
    default: TORCH_CHECK(false, "unsupported dtype");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over the paged KV cache (CPU)");
}
