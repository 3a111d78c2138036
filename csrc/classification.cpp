#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "kernels.h"

namespace lorafit {
namespace {

// Rows are summed in fixed blocks, then blocks in order: results do not depend on the
// number of threads.
constexpr int64_t kBlock = 4096;

struct BlockSums {
  double nll = 0.0;
  double brier = 0.0;
  int64_t nan_rows = 0;
  int64_t first_nan_input = -1;
};

// Writes the row's prediction and ECE bin (-1 when its softmax is NaN); returns whether
// the logits contain NaN. `scores` (stride `score_stride`) receives the probabilities.
bool classify_row(const void* row, DType dtype, int64_t num_classes, int64_t label,
                  int64_t ece_bins, double* work, float* scores, int64_t score_stride,
                  int32_t* prediction, int32_t* bin, double* confidence, BlockSums& sums) {
  double max_logit = -kInf;
  int32_t argmax = 0;
  bool has_nan = false;
  for (int64_t k = 0; k < num_classes; ++k) {
    const double x = load_as_double(row, dtype, k);
    work[k] = x;
    has_nan |= x != x;
    if (x > max_logit) {  // strict: the first maximal index wins, as torch.argmax
      max_logit = x;
      argmax = int32_t(k);
    }
  }
  *prediction = argmax;
  if (has_nan) return true;
  const bool binary = num_classes == 2;
  if (std::isinf(max_logit)) {  // +inf or all -inf: torch's softmax is NaN
    *bin = -1;
    *confidence = 0.0;
    sums.nan_rows += 1;
    sums.nll = sums.brier = kNaN;
    if (scores) {
      const float nan = std::numeric_limits<float>::quiet_NaN();
      for (int64_t k = 0; k < (binary ? 1 : num_classes); ++k) scores[k * score_stride] = nan;
    }
    return false;
  }
  double total = 0.0;
  for (int64_t k = 0; k < num_classes; ++k) {
    work[k] = std::exp(work[k] - max_logit);
    total += work[k];
  }
  const double inv_total = 1.0 / total;
  double brier = 0.0;
  for (int64_t k = 0; k < num_classes; ++k) {
    const double p = work[k] * inv_total;
    const double diff = p - (k == label ? 1.0 : 0.0);
    brier += diff * diff;
    if (scores && (!binary || k == 1)) scores[(binary ? 0 : k) * score_stride] = float(p);
  }
  const double top_probability = inv_total;  // the top logit contributes exp(0) = 1
  sums.nll += max_logit - load_as_double(row, dtype, label) + std::log(total);
  sums.brier += binary ? 0.5 * brier : brier;  // binary: the usual (p1 - y)^2
  *confidence = top_probability;
  *bin = int32_t(std::min(int64_t(top_probability * double(ece_bins)), ece_bins - 1));
  return false;
}

}  // namespace

int64_t classification_update(const void* logits, DType dtype, int64_t rows,
                              const int64_t* labels, const ClassificationState& state,
                              float* scores) {
  const int64_t num_classes = state.num_classes;
  const int64_t row_bytes = num_classes * dtype_size(dtype);
  const int64_t blocks = (rows + kBlock - 1) / kBlock;
  std::vector<int32_t> predictions(static_cast<size_t>(rows));
  std::vector<int32_t> bins(static_cast<size_t>(rows));
  std::vector<double> confidences(static_cast<size_t>(rows));
  std::vector<BlockSums> block_sums(static_cast<size_t>(blocks));

#pragma omp parallel
  {
    std::vector<double> work(static_cast<size_t>(num_classes));
#pragma omp for schedule(dynamic, 4)
    for (int64_t block = 0; block < blocks; ++block) {
      BlockSums& sums = block_sums[block];
      const int64_t end = std::min(rows, (block + 1) * kBlock);
      for (int64_t r = block * kBlock; r < end; ++r) {
        const void* row = static_cast<const char*>(logits) + r * row_bytes;
        const bool has_nan = classify_row(
            row, dtype, num_classes, labels[r], state.ece_bins, work.data(),
            scores ? scores + r : nullptr, rows, &predictions[r], &bins[r], &confidences[r],
            sums);
        if (has_nan) {
          sums.first_nan_input = r;
          break;
        }
      }
    }
  }
  for (const BlockSums& sums : block_sums) {
    if (sums.first_nan_input >= 0) return sums.first_nan_input;  // state untouched
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t label = labels[r], prediction = predictions[r], bin = bins[r];
    state.confusion[label * num_classes + prediction] += 1;
    if (bin < 0) continue;
    state.ece_count[bin] += 1;
    state.ece_conf_sum[bin] += confidences[r];
    state.ece_correct[bin] += prediction == label;
  }
  for (const BlockSums& sums : block_sums) {
    state.sums[0] += sums.nll;
    state.sums[1] += sums.brier;
    state.counts[1] += sums.nan_rows;
  }
  state.counts[0] += rows;
  return -1;
}

}  // namespace lorafit
