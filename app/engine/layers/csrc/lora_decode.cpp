// Multi-LoRA for decode rows on CPU: y[r] += (x[r] · A_s^T) · B_s^T for each row r with adapter
// slot s, computing only the row's own adapter (the SGMV/BGMV idea), in one call per linear.
//
// The masked all-adapter products it replaces compute every resident adapter for every row and
// zero the others (8 adapters: 8x the useful work); with all-projection adapters that made the
// LoRA terms cost about as much as the base linears of a decode step. Rows come sorted by slot
// (the model runner orders them), so each run of one adapter is one task: its A and B^T are read
// once per group of up to kGroup rows, the shrink (x·A^T) and expand (·B^T) run in float32.
//
// Shapes: y [T, out] (its first `rows` rows are updated in place), x [T, in] (rows contiguous),
// A [R, in] and Bt [R, out] (B transposed, so the expand is 16-wide FMAs along out) of the
// resident adapters side by side, row_slots [rows] int64, slot_cols [S, 2] int64: the column
// range [c0, c1) of each slot in A/Bt (c0 == c1: the slot has no weights for this linear),
// col_out [R, 2] int64: the output range [o0, o1) outside which column k of B is zero.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec16.h"

namespace {

constexpr int kGroup = 4;  // rows of one adapter sharing each load of its weights

template <typename T>
void lora_decode_impl(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& bt,
                      const int64_t* slots, const int64_t* cols, const int64_t* col_out, int64_t rows) {
  const int64_t in = x.size(1), out = y.size(1);
  const int64_t xs = x.stride(0), ys = y.stride(0);
  const T* xp = x.data_ptr<T>();
  const T* ap = a.data_ptr<T>();
  const T* bp = bt.data_ptr<T>();
  T* yp = y.data_ptr<T>();

  // Runs of rows of one adapter (base rows and slots without weights here are skipped).
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t r = 0; r < rows;) {
    int64_t e = r + 1;
    while (e < rows && slots[e] == slots[r]) ++e;
    const int64_t s = slots[r];
    if (s > 0 && cols[2 * s + 1] > cols[2 * s])
      for (int64_t g = r; g < e; g += kGroup) runs.emplace_back(g, std::min(e, g + kGroup));
    r = e;
  }
  const int64_t n = static_cast<int64_t>(runs.size());
  if (n == 0) return;
  const int64_t lanes = std::min<int64_t>(n, std::max<int64_t>(1, at::get_num_threads()));
  at::parallel_for(0, lanes, 1, [&](int64_t lane_begin, int64_t lane_end) {
    std::vector<float> xf(kGroup * in), xa;
    std::vector<float> acc(kGroup * out);
    for (int64_t lane = lane_begin; lane < lane_end; ++lane)
    for (int64_t i = lane; i < n; i += lanes) {
      const int64_t r0 = runs[i].first, g = runs[i].second - r0;
      const int64_t s = slots[r0], c0 = cols[2 * s], rank = cols[2 * s + 1] - c0;
      for (int64_t j = 0; j < g; ++j)
        for (int64_t d = 0; d < in; ++d) xf[j * in + d] = static_cast<float>(xp[(r0 + j) * xs + d]);
      // shrink: xa[j][k] = x[j] · A[c0 + k]
      xa.assign(kGroup * rank, 0.f);
      for (int64_t k = 0; k < rank; ++k) {
        const T* arow = ap + (c0 + k) * in;
        v16 sum[kGroup] = {};
        int64_t d = 0;
        for (; d + 16 <= in; d += 16) {
          const v16 av = load16(arow + d);
          for (int64_t j = 0; j < g; ++j) {
            v16 xv;
            std::memcpy(&xv, &xf[j * in + d], sizeof(xv));
            sum[j] += av * xv;
          }
        }
        for (int64_t j = 0; j < g; ++j) {
          float t = hsum(sum[j]);
          for (int64_t e = d; e < in; ++e) t += static_cast<float>(arow[e]) * xf[j * in + e];
          xa[j * rank + k] = t;
        }
      }
      // expand: acc[j] = xa[j] · Bt[c0 : c0 + rank], 16 outputs at a time. A fused linear's B is
      // block-diagonal (q, k, v each its own output range): columns are taken in runs that share
      // an output range (col_out), and only that range is computed.
      std::fill(acc.begin(), acc.begin() + g * out, 0.f);
      for (int64_t ka = 0; ka < rank;) {
        const int64_t o0 = col_out[2 * (c0 + ka)], o1 = col_out[2 * (c0 + ka) + 1];
        int64_t kb = ka + 1;
        while (kb < rank && col_out[2 * (c0 + kb)] == o0 && col_out[2 * (c0 + kb) + 1] == o1) ++kb;
        int64_t o = o0;
        for (; o + 16 <= o1; o += 16) {
          v16 sum[kGroup] = {};
          for (int64_t k = ka; k < kb; ++k) {
            const v16 bv = load16(bp + (c0 + k) * out + o);
            for (int64_t j = 0; j < g; ++j) sum[j] += xa[j * rank + k] * bv;
          }
          for (int64_t j = 0; j < g; ++j) {
            v16 cur;
            std::memcpy(&cur, &acc[j * out + o], sizeof(v16));
            cur += sum[j];
            std::memcpy(&acc[j * out + o], &cur, sizeof(v16));
          }
        }
        for (; o < o1; ++o)
          for (int64_t j = 0; j < g; ++j) {
            float t = 0.f;
            for (int64_t k = ka; k < kb; ++k) t += xa[j * rank + k] * static_cast<float>(bp[(c0 + k) * out + o]);
            acc[j * out + o] += t;
          }
        ka = kb;
      }
      for (int64_t j = 0; j < g; ++j) {
        T* yr = yp + (r0 + j) * ys;
        for (int64_t q = 0; q < out; ++q) yr[q] = static_cast<T>(static_cast<float>(yr[q]) + acc[j * out + q]);
      }
    }
  });
}

}  // namespace

void lora_decode_(at::Tensor y, at::Tensor x, at::Tensor a, at::Tensor bt, at::Tensor row_slots,
                  at::Tensor slot_cols, at::Tensor col_out, int64_t rows) {
  TORCH_CHECK(y.dim() == 2 && x.dim() == 2 && a.dim() == 2 && bt.dim() == 2, "lora_decode_: 2-d tensors");
  TORCH_CHECK(y.stride(1) == 1 && x.stride(1) == 1, "lora_decode_: rows of x and y must be contiguous");
  TORCH_CHECK(a.is_contiguous() && bt.is_contiguous(), "lora_decode_: A and Bt must be contiguous");
  TORCH_CHECK(a.size(1) == x.size(1) && bt.size(1) == y.size(1) && a.size(0) == bt.size(0), "lora_decode_: shapes");
  TORCH_CHECK(rows <= x.size(0) && rows <= y.size(0) && row_slots.numel() >= rows, "lora_decode_: rows");
  TORCH_CHECK(x.scalar_type() == y.scalar_type() && a.scalar_type() == y.scalar_type() &&
              bt.scalar_type() == y.scalar_type(), "lora_decode_: one dtype");
  TORCH_CHECK(col_out.dim() == 2 && col_out.size(0) == a.size(0) && col_out.size(1) == 2, "lora_decode_: col_out [R, 2]");
  col_out = col_out.to(at::kLong).contiguous();
  const int64_t* co = col_out.data_ptr<int64_t>();
  for (int64_t k = 0; k < col_out.size(0); ++k)
    TORCH_CHECK(co[2 * k] >= 0 && co[2 * k] <= co[2 * k + 1] && co[2 * k + 1] <= y.size(1), "lora_decode_: col_out range");
  row_slots = row_slots.to(at::kLong).contiguous();
  slot_cols = slot_cols.to(at::kLong).contiguous();
  const int64_t* slots = row_slots.data_ptr<int64_t>();
  const int64_t num_slots = slot_cols.size(0);
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(slots[r] >= 0 && slots[r] < num_slots, "lora_decode_: slot out of range");
  switch (y.scalar_type()) {
    case at::kBFloat16: lora_decode_impl<at::BFloat16>(y, x, a, bt, slots, slot_cols.data_ptr<int64_t>(), co, rows); break;
    case at::kHalf: lora_decode_impl<at::Half>(y, x, a, bt, slots, slot_cols.data_ptr<int64_t>(), co, rows); break;
    default: TORCH_CHECK(false, "lora_decode_: bfloat16 or float16");
  }
}
