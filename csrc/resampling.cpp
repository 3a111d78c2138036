#include <algorithm>
#include <cstring>
#include <utility>
#include <vector>

#include "kernels.h"

namespace lorafit {
namespace {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Counter-based stream: draw j of replicate b is
//   x = lowbias32(lowbias32(uint32(j) + k_lo) ^ k_hi),  k = splitmix64(splitmix64(seed) + b),
// a pure function of (seed, b, j): threads do not matter and the numpy reference
// reproduces every draw. A bootstrap row is (x * rows) >> 32 (Lemire); a permutation swaps
// A and B on row j when x's top bit is set. 32-bit lanes let the hashing vectorise.
inline uint64_t replicate_key(uint64_t seed, int64_t replicate) {
  return splitmix64(splitmix64(seed) + uint64_t(replicate));
}

LORAFIT_INLINE vu8 lowbias32(vu8 x) {  // Chris Wellons' 32-bit integer hash
  x ^= x >> 16;
  x *= 0x7feb352du;
  x ^= x >> 15;
  x *= 0x846ca68bu;
  x ^= x >> 16;
  return x;
}

constexpr int64_t kDrawBlock = 256;

// Draws j = start .. start + kDrawBlock - 1 (a multiple of 8) into `out`.
LORAFIT_SIMD_DISPATCH
void draw_block(uint64_t key, int64_t start, uint32_t* out) {
  const vu8 lanes = {0, 1, 2, 3, 4, 5, 6, 7};
  const uint32_t key_low = uint32_t(key), key_high = uint32_t(key >> 32);
  for (int64_t i = 0; i < kDrawBlock; i += kLanes) {
    const vu8 j = lanes + uint32_t(start + i);
    const vu8 x = lowbias32(lowbias32(j + key_low) ^ key_high);
    std::memcpy(out + i, &x, sizeof x);
  }
}

// Per-replicate class counts. With few classes each draw bumps one cell of a joint
// (label, prediction) histogram and the marginals are derived afterwards; with many
// classes (a C*C histogram would not fit in cache) it bumps the three marginals directly.
struct Counts {
  int64_t num_classes;
  bool joint;
  std::vector<int64_t> cells_a, cells_b;  // joint histograms, [C * C]
  std::vector<int64_t> label, pred_a, hit_a, pred_b, hit_b;
  Counts(int64_t c, bool use_joint)
      : num_classes(c), joint(use_joint), cells_a(use_joint ? c * c : 0), cells_b(cells_a.size()),
        label(c), pred_a(c), hit_a(c), pred_b(c), hit_b(c) {}

  void clear() {
    for (auto* v : {&cells_a, &cells_b, &label, &pred_a, &hit_a, &pred_b, &hit_b}) {
      std::fill(v->begin(), v->end(), 0);
    }
  }

  void finish(bool with_b) {
    if (!joint) return;
    for (int64_t y = 0; y < num_classes; ++y) {
      for (int64_t p = 0; p < num_classes; ++p) {
        const int64_t a = cells_a[y * num_classes + p];
        label[y] += a;
        pred_a[p] += a;
        if (with_b) pred_b[p] += cells_b[y * num_classes + p];
      }
      hit_a[y] = cells_a[y * num_classes + y];
      if (with_b) hit_b[y] = cells_b[y * num_classes + y];
    }
  }
};

// Macro F1 over the classes present in the labels or the predictions.
double macro_f1(const std::vector<int64_t>& label, const std::vector<int64_t>& pred,
                const std::vector<int64_t>& hit) {
  double total = 0.0;
  int64_t present = 0;
  for (size_t k = 0; k < label.size(); ++k) {
    const int64_t denominator = label[k] + pred[k];
    if (denominator == 0) continue;
    total += 2.0 * double(hit[k]) / double(denominator);
    ++present;
  }
  return present ? total / double(present) : kNaN;
}

double accuracy(const std::vector<int64_t>& hit, int64_t rows) {
  int64_t hits = 0;
  for (int64_t h : hit) hits += h;
  return double(hits) / double(rows);
}

}  // namespace

void resample_stats(const int64_t* labels, const int64_t* preds_a, const int64_t* preds_b,
                    const double* values, int64_t rows, int64_t num_classes,
                    int64_t replicates, uint64_t seed, bool permute, double* out) {
  const bool joint = num_classes <= 64;
  // Joint path: (label, prediction) packed into 2 bytes per row, so the rows fit in L1.
  std::vector<uint16_t> codes_a(joint ? rows : 0), codes_b(joint && preds_b ? rows : 0);
  for (size_t r = 0; r < codes_a.size(); ++r) {
    codes_a[r] = uint16_t(labels[r] * num_classes + preds_a[r]);
    if (preds_b) codes_b[r] = uint16_t(labels[r] * num_classes + preds_b[r]);
  }
#pragma omp parallel
  {
    Counts counts(num_classes, joint);
    // Raw pointers in locals: the compiler keeps them in registers across the increments.
    int64_t* const cells_a = counts.cells_a.data();
    int64_t* const cells_b = counts.cells_b.data();
    int64_t* const label_count = counts.label.data();
    int64_t* const pred_a = counts.pred_a.data();
    int64_t* const hit_a = counts.hit_a.data();
    int64_t* const pred_b = counts.pred_b.data();
    int64_t* const hit_b = counts.hit_b.data();
    const uint16_t* const code_a = codes_a.data();
    const uint16_t* const code_b = codes_b.data();
    alignas(32) uint32_t draws[kDrawBlock];
#pragma omp for schedule(dynamic, 4)
    for (int64_t b = 0; b < replicates; ++b) {
      const uint64_t key = replicate_key(seed, b);
      counts.clear();
      double value_sums[4] = {0.0, 0.0, 0.0, 0.0};  // 4 chains: no add-latency bound
      for (int64_t j = 0; j < rows; ++j) {
        if (j % kDrawBlock == 0) draw_block(key, j, draws);
        const uint32_t x = draws[j % kDrawBlock];
        const bool swap = permute && (x >> 31);
        // Lemire's multiply-shift maps 32 random bits onto [0, rows).
        const int64_t i = permute ? j : int64_t((uint64_t(x) * uint64_t(rows)) >> 32);
        if (joint) {
          uint16_t ca = code_a[i];
          if (preds_b) {
            uint16_t cb = code_b[i];
            if (swap) std::swap(ca, cb);
            cells_b[cb] += 1;
          }
          cells_a[ca] += 1;
        } else {
          const int64_t y = labels[i];
          int64_t pa = preds_a[i];
          if (preds_b) {
            int64_t pb = preds_b[i];
            if (swap) std::swap(pa, pb);
            pred_b[pb] += 1;
            hit_b[y] += pb == y;
          }
          pred_a[pa] += 1;
          hit_a[y] += pa == y;
          label_count[y] += 1;
        }
        if (values) value_sums[j % 4] += values[i];
      }
      const double value_sum = (value_sums[0] + value_sums[1]) + (value_sums[2] + value_sums[3]);
      counts.finish(preds_b != nullptr);
      double* row = out + b * 5;
      row[0] = accuracy(counts.hit_a, rows);
      row[1] = macro_f1(counts.label, counts.pred_a, counts.hit_a);
      row[2] = preds_b ? accuracy(counts.hit_b, rows) : kNaN;
      row[3] = preds_b ? macro_f1(counts.label, counts.pred_b, counts.hit_b) : kNaN;
      row[4] = values ? value_sum / double(rows) : kNaN;
    }
  }
}

}  // namespace lorafit
