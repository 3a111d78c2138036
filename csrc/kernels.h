// Plain C++ evaluation kernels behind lorafit._C (bindings.cpp only converts arguments).
// All kernels read contiguous row-major buffers, accumulate in double and use OpenMP.
#pragma once

#include <cstdint>

#include "simd.h"

namespace lorafit {

// Per-row token statistics for logits[rows, vocab] in one pass over memory:
// nll[r] = logsumexp(row) - row[label] (0 for ignored rows), and rank[r] = how many
// entries beat the label's logit (greater, or equal at a smaller index, so rank 0 is
// exactly argmax == label). Returns the first row containing NaN, or -1.
int64_t token_stats(const void* logits, DType dtype, int64_t rows, int64_t vocab,
                    const int64_t* labels, int64_t ignore_index, double* nll, int64_t* rank);

// Running state of a classification accumulator (arrays owned by the caller).
struct ClassificationState {
  int64_t num_classes;
  int64_t ece_bins;
  int64_t* confusion;     // [C, C], rows = true label, columns = prediction
  int64_t* ece_count;     // [ece_bins]
  double* ece_conf_sum;   // [ece_bins] sum of top-label confidence
  int64_t* ece_correct;   // [ece_bins]
  double* sums;           // [2] nll sum, Brier sum
  int64_t* counts;        // [2] rows seen, rows whose softmax is NaN (a +inf or all -inf row)
};

// Adds a batch logits[rows, C] to `state`. If `scores` is non-null it receives the
// float32 probabilities kept for AUROC/AUPRC: p(class 1) per row when C == 2, else the
// softmax class-major, [C, rows], so each class is one contiguous run for ranking.
// Returns the first row containing NaN (state untouched), or -1.
int64_t classification_update(const void* logits, DType dtype, int64_t rows,
                              const int64_t* labels, const ClassificationState& state,
                              float* scores);

// One-vs-rest AUROC and average precision from stored scores. With columns == 1 the
// scores are p(class 1) of a binary task and one value is written; otherwise scores is
// class-major [columns, rows] and class k is scored against labels == k. Undefined
// values (no positives, or a NaN score) are NaN.
void rank_metrics(const int64_t* labels, const float* scores, int64_t rows, int64_t columns,
                  double* auroc, double* average_precision);

// Resampled statistics for bootstrap and permutation tests. For each replicate b it
// writes out[b, :] = {accuracy_a, macro_f1_a, accuracy_b, macro_f1_b, mean_value}.
// Bootstrap: rows are drawn with replacement. Permute: every row is kept and a coin
// decides whether systems a and b swap predictions on it. preds_b/values may be null.
// Draws come from a counter-based hash (resampling.cpp), so results do not depend
// on the thread count.
void resample_stats(const int64_t* labels, const int64_t* preds_a, const int64_t* preds_b,
                    const double* values, int64_t rows, int64_t num_classes,
                    int64_t replicates, uint64_t seed, bool permute, double* out);

}  // namespace lorafit
