#include <cmath>
#include <cstring>
#include <vector>

#include "kernels.h"

namespace lorafit {
namespace {

// Maps floats to unsigned integers with the same order; -0.0 becomes +0.0 so they tie.
inline uint32_t ordered_bits(float x) {
  x += 0.0f;
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

// LSD radix sort of 32-bit keys, 8 bits a pass; one read builds all four histograms
// and passes over a constant byte are skipped.
void radix_sort(std::vector<uint32_t>& keys, std::vector<uint32_t>& scratch) {
  const size_t n = keys.size();
  if (n < 2) return;
  scratch.resize(n);
  size_t histograms[4][256] = {};
  for (uint32_t key : keys) {
    ++histograms[0][key & 0xff];
    ++histograms[1][(key >> 8) & 0xff];
    ++histograms[2][(key >> 16) & 0xff];
    ++histograms[3][key >> 24];
  }
  for (int pass = 0; pass < 4; ++pass) {
    size_t* counts = histograms[pass];
    const int shift = 8 * pass;
    if (counts[(keys[0] >> shift) & 0xff] == n) continue;
    size_t offset = 0;
    for (size_t d = 0; d < 256; ++d) {
      const size_t count = counts[d];
      counts[d] = offset;
      offset += count;
    }
    for (uint32_t key : keys) scratch[counts[(key >> shift) & 0xff]++] = key;
    keys.swap(scratch);
  }
}

// Positive and negative scores are sorted apart (4-byte keys move half the bytes of
// key+label pairs), then walked together from the top score down.
// AUROC is the trapezoidal area (ties count half, equal to the Mann-Whitney average-rank
// form); average precision sums delta-recall * precision over distinct thresholds.
void score_one_vs_rest(std::vector<uint32_t>& positive, std::vector<uint32_t>& negative,
                       std::vector<uint32_t>& scratch, double* auroc,
                       double* average_precision) {
  const int64_t positives = int64_t(positive.size()), negatives = int64_t(negative.size());
  *auroc = kNaN;
  *average_precision = kNaN;
  if (positives == 0) return;
  radix_sort(positive, scratch);
  radix_sort(negative, scratch);
  double area = 0.0, ap = 0.0;
  int64_t true_pos = 0, false_pos = 0;
  int64_t i = positives - 1, j = negatives - 1;
  while (i >= 0 || j >= 0) {
    uint32_t key = 0;
    if (i >= 0) key = positive[i];
    if (j >= 0 && negative[j] > key) key = negative[j];
    int64_t group_pos = 0, group_neg = 0;
    for (; i >= 0 && positive[i] == key; --i) ++group_pos;
    for (; j >= 0 && negative[j] == key; --j) ++group_neg;
    area += double(group_neg) * (double(true_pos) + 0.5 * double(group_pos));
    true_pos += group_pos;
    false_pos += group_neg;
    if (group_pos > 0) {
      ap += double(group_pos) / double(positives) *
            (double(true_pos) / double(true_pos + false_pos));
    }
  }
  *average_precision = ap;
  if (negatives > 0) *auroc = area / (double(positives) * double(negatives));
}

}  // namespace

void rank_metrics(const int64_t* labels, const float* scores, int64_t rows, int64_t columns,
                  double* auroc, double* average_precision) {
  const bool binary = columns == 1;
#pragma omp parallel
  {
    std::vector<uint32_t> positive(static_cast<size_t>(rows)), negative(positive.size()), scratch;
#pragma omp for schedule(dynamic, 1)
    for (int64_t k = 0; k < columns; ++k) {
      const int64_t positive_label = binary ? 1 : k;
      const float* column = scores + k * rows;  // class-major: one contiguous read
      positive.resize(static_cast<size_t>(rows));
      negative.resize(static_cast<size_t>(rows));
      size_t n_pos = 0, n_neg = 0;
      bool has_nan = false;
      for (int64_t r = 0; r < rows; ++r) {  // branch-free split by label
        const float s = column[r];
        has_nan |= s != s;
        const uint32_t key = ordered_bits(s);
        const bool is_pos = labels[r] == positive_label;
        positive[n_pos] = key;
        negative[n_neg] = key;
        n_pos += is_pos;
        n_neg += !is_pos;
      }
      if (has_nan) {  // a NaN softmax row (from +inf logits) has no rank
        auroc[k] = average_precision[k] = kNaN;
        continue;
      }
      positive.resize(n_pos);
      negative.resize(n_neg);
      score_one_vs_rest(positive, negative, scratch, auroc + k, average_precision + k);
    }
  }
}

}  // namespace lorafit
