#include <algorithm>
#include <cmath>
#include <vector>

#include "kernels.h"

namespace lorafit {
namespace {

// Rows are processed in L1-sized chunks: one read from memory, then the max/rank pass
// and the exp-sum pass both hit L1. The running log-sum-exp is rescaled per chunk.
constexpr int64_t kChunk = 2048;

struct RowResult {
  double nll;
  int64_t rank;
  bool has_nan;
};

LORAFIT_SIMD_DISPATCH
RowResult token_row(const void* row, DType dtype, int64_t vocab, int64_t label, float* buffer) {
  const float label_logit = float(load_as_double(row, dtype, label));
  const vf8 label_v = splat(label_logit);
  const vi8 label_index = vi8{} + int32_t(label);
  const vi8 lane_offsets = {0, 1, 2, 3, 4, 5, 6, 7};

  double running_max = -kInf;
  double running_sum = 0.0;  // sum of exp(x - running_max)
  bool saw_pos_inf = false;
  vi8 nan_lanes = {};
  vi8 rank_lanes = {};

  for (int64_t start = 0; start < vocab; start += kChunk) {
    const int64_t n = std::min(kChunk, vocab - start);
    const int64_t padded = (n + kLanes - 1) / kLanes * kLanes;
    const float* x;
    if (dtype == DType::Float32 && n == padded) {
      x = static_cast<const float*>(row) + start;
    } else {
      convert_to_float(static_cast<const char*>(row) + start * dtype_size(dtype), dtype, n,
                       buffer);
      // -inf padding is neutral for max, rank and the exp-sum.
      for (int64_t i = n; i < padded; ++i) buffer[i] = -kInfF;
      x = buffer;
    }

    vf8 max_lanes = splat(-kInfF);
    vi8 index = lane_offsets + int32_t(start);
    for (int64_t i = 0; i < padded; i += kLanes) {
      const vf8 v = load8(x + i);
      max_lanes = v > max_lanes ? v : max_lanes;
      nan_lanes |= v != v;
      const vi8 beats = (v > label_v) | ((v == label_v) & (index < label_index));
      rank_lanes -= beats;  // true lanes are -1
      index += kLanes;
    }
    float chunk_max = max_lanes[0];
    for (int j = 1; j < kLanes; ++j) chunk_max = std::max(chunk_max, max_lanes[j]);

    if (chunk_max == kInfF) saw_pos_inf = true;
    if (saw_pos_inf || chunk_max == -kInfF) continue;  // nothing to add to the sum
    if (chunk_max > running_max) {
      running_sum *= std::exp(running_max - double(chunk_max));
      running_max = chunk_max;
    }
    const vf8 shift = splat(float(running_max));
    vd4 sum_lo = {}, sum_hi = {};
    for (int64_t i = 0; i < padded; i += kLanes) {
      add_as_double(exp_nonpositive(load8(x + i) - shift), sum_lo, sum_hi);
    }
    const vd4 sum = sum_lo + sum_hi;
    running_sum += (sum[0] + sum[1]) + (sum[2] + sum[3]);
  }

  RowResult result;
  result.has_nan = false;
  for (int j = 0; j < kLanes; ++j) result.has_nan |= nan_lanes[j] != 0;
  result.rank = 0;
  for (int j = 0; j < kLanes; ++j) result.rank += rank_lanes[j];
  // torch log_softmax semantics: a +inf or an all -inf row gives NaN.
  if (saw_pos_inf || running_max == -kInf) {
    result.nll = kNaN;
  } else {
    result.nll = running_max - double(label_logit) + std::log(running_sum);
  }
  return result;
}

}  // namespace

int64_t token_stats(const void* logits, DType dtype, int64_t rows, int64_t vocab,
                    const int64_t* labels, int64_t ignore_index, double* nll, int64_t* rank) {
  const int64_t row_bytes = vocab * dtype_size(dtype);
  int64_t first_nan_row = rows;
#pragma omp parallel reduction(min : first_nan_row)
  {
    std::vector<float> buffer(kChunk);
#pragma omp for schedule(dynamic, 4)
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t label = labels[r];
      if (label == ignore_index) {
        nll[r] = 0.0;
        rank[r] = -1;
        continue;
      }
      const void* row = static_cast<const char*>(logits) + r * row_bytes;
      const RowResult result = token_row(row, dtype, vocab, label, buffer.data());
      nll[r] = result.nll;
      rank[r] = result.rank;
      if (result.has_nan) first_nan_row = std::min(first_nan_row, r);
    }
  }
  return first_nan_row == rows ? -1 : first_nan_row;
}

}  // namespace lorafit
