#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "kernels.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace lorafit {
namespace {

inline uint64_t splitmix64(uint64_t x) {
  x += 0x9E3779B97F4A7C15ull;
  x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
  x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
  return x ^ (x >> 31);
}

// Counter-based stream: draw j of replicate b is
//   x = lowbias32(uint32(j) * (k_lo | 1) + k_hi),  k = splitmix64(splitmix64(seed) + b),
// i.e. Wellons' hash of a Weyl sequence whose odd stride and offset are the replicate's key
// (as SplitMix hashes a Weyl sequence). Different replicates walk progressions of different
// strides, never shifted windows of one sequence. It is a pure function of (seed, b, j):
// threads do not matter and the numpy reference reproduces every draw. A bootstrap row is (x * rows) >> 32 (Lemire); a permutation swaps
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

typedef uint64_t vq4 __attribute__((vector_size(32)));

// Eight consecutive draws j = start .. start + 7 of the replicate with this key.
LORAFIT_INLINE vu8 draws8(uint32_t key_low, uint32_t key_high, uint32_t start) {
  const vu8 lanes = {0, 1, 2, 3, 4, 5, 6, 7};
  return lowbias32((lanes + start) * (key_low | 1u) + key_high);
}

// Lemire's multiply-shift (x * rows) >> 32 on all 8 lanes, in lane order: even lanes'
// results land in the low halves, odd lanes' in the high halves of the 64-bit products.
// (GCC 12 still emulates the 64-bit multiplies; bounded8_small avoids them for <= 2^16 rows.)
LORAFIT_INLINE vu8 bounded8(vu8 x, const vq4 rows) {
  const vq4 q = (vq4)x, n = rows & 0xffffffffull;
  const vq4 even = ((q & 0xffffffffull) * n) >> 32;
  const vq4 odd = ((q >> 32) * n) & 0xffffffff00000000ull;
  return (vu8)(even | odd);
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

// --- Generic path: any class count, paired systems, permutations. ---
struct Inputs {
  const int64_t* labels;
  const int64_t* preds_a;
  const int64_t* preds_b;  // may be null
  const double* values;    // may be null
  const uint16_t* code_a;  // (label, prediction) packed, when joint
  const uint16_t* code_b;
  int64_t rows;
  int64_t num_classes;
  uint64_t seed;
  bool permute;
  bool joint;
};

// Counts one replicate into `counts` (cleared first); returns the sum of the drawn values.
LORAFIT_SIMD_DISPATCH
double generic_counts(const Inputs& in, uint64_t key, Counts& counts) {
  counts.clear();
  int64_t* const cells_a = counts.cells_a.data();
  int64_t* const cells_b = counts.cells_b.data();
  int64_t* const label_count = counts.label.data();
  int64_t* const pred_a = counts.pred_a.data();
  int64_t* const hit_a = counts.hit_a.data();
  int64_t* const pred_b = counts.pred_b.data();
  int64_t* const hit_b = counts.hit_b.data();
  const int64_t rows = in.rows;
  const uint32_t key_low = uint32_t(key), key_high = uint32_t(key >> 32);
  const vq4 rows_v = vq4{} + uint64_t(rows);
  double value_sums[4] = {0.0, 0.0, 0.0, 0.0};  // 4 chains: no add-latency bound
  for (int64_t start = 0; start < rows; start += kLanes) {
    const vu8 x = draws8(key_low, key_high, uint32_t(start));
    const vu8 bounded = bounded8(x, rows_v);
    alignas(32) uint32_t draw[kLanes], index[kLanes];
    std::memcpy(draw, &x, sizeof x);
    std::memcpy(index, &bounded, sizeof bounded);
    const int lanes = int(std::min<int64_t>(kLanes, rows - start));
    for (int l = 0; l < lanes; ++l) {
      const int64_t j = start + l;
      const bool swap = in.permute && (draw[l] >> 31);
      const int64_t i = in.permute ? j : int64_t(index[l]);
      if (in.joint) {
        uint16_t ca = in.code_a[i];
        if (in.preds_b) {
          uint16_t cb = in.code_b[i];
          if (swap) std::swap(ca, cb);
          cells_b[cb] += 1;
        }
        cells_a[ca] += 1;
      } else {
        const int64_t y = in.labels[i];
        int64_t pa = in.preds_a[i];
        if (in.preds_b) {
          int64_t pb = in.preds_b[i];
          if (swap) std::swap(pa, pb);
          pred_b[pb] += 1;
          hit_b[y] += pb == y;
        }
        pred_a[pa] += 1;
        hit_a[y] += pa == y;
        label_count[y] += 1;
      }
      if (in.values) value_sums[l % 4] += in.values[i];
    }
  }
  return (value_sums[0] + value_sums[1]) + (value_sums[2] + value_sums[3]);
}

void generic_replicate(const Inputs& in, int64_t b, Counts& counts, double* row) {
  const double value_sum = generic_counts(in, replicate_key(in.seed, b), counts);
  counts.finish(in.preds_b != nullptr);
  row[0] = accuracy(counts.hit_a, in.rows);
  row[1] = macro_f1(counts.label, counts.pred_a, counts.hit_a);
  row[2] = in.preds_b ? accuracy(counts.hit_b, in.rows) : kNaN;
  row[3] = in.preds_b ? macro_f1(counts.label, counts.pred_b, counts.hit_b) : kNaN;
  row[4] = in.values ? value_sum / double(in.rows) : kNaN;
}

// --- Fast path: bootstrap of one system (bootstrap_ci). ---
// Rows are laid out once, grouped by (label, prediction) cell, each cell's run padded to a
// multiple of 16 slots; `slot[i]` is row i's place. A replicate then only bumps a byte
// counter per draw, `hits[slot[i]]++`, with the draws hashed and bounded 8 lanes at a time
// and never written to a buffer (random rows rarely collide, so there are no store-to-load
// chains; for 10k rows slots + counters take 30 KB, in L1). One sequential, vectorised pass
// then sums each cell's run and takes the dot product of the counters with the values in
// slot order, so the values are never gathered. A counter that wrapped (a row drawn 256+
// times, which the replicate's total reveals) makes that replicate rerun on the exact
// generic path.
struct Cell {
  int64_t label, pred;
  int64_t begin, end;  // slot range, multiples of 16
};

struct Layout {
  std::vector<Cell> cells;
  int64_t slots = 0;            // padded to a multiple of 32
  std::vector<uint16_t> slot16;  // row -> slot, when slots <= 65536
  std::vector<uint32_t> slot32;
  std::vector<double> values;    // [slots], 0 in the padding
};

// (x * rows) >> 32 for rows <= 2^16 with 32-bit lanes only (x = hi * 2^16 + lo; no partial
// product or sum exceeds 32 bits, and dropping the low product's fraction cannot carry).
LORAFIT_INLINE vu8 bounded8_small(vu8 x, uint32_t rows) {
  const vu8 low = ((x & 0xffffu) * rows) >> 16;
  return ((x >> 16) * rows + low) >> 16;
}

template <typename Slot>
LORAFIT_INLINE void count_draws(uint64_t key, int64_t rows, const Slot* slot, uint8_t* hits) {
  const uint32_t key_low = uint32_t(key), key_high = uint32_t(key >> 32);
  const vq4 rows_v = vq4{} + uint64_t(rows);
  int64_t start = 0;
  for (; start + kLanes <= rows; start += kLanes) {
    const vu8 x = draws8(key_low, key_high, uint32_t(start));
    // Slot16 implies rows <= 65536.
    const vu8 index = sizeof(Slot) == 2 ? bounded8_small(x, uint32_t(rows)) : bounded8(x, rows_v);
    alignas(32) uint32_t i[kLanes];
    std::memcpy(i, &index, sizeof index);
    const Slot s0 = slot[i[0]], s1 = slot[i[1]], s2 = slot[i[2]], s3 = slot[i[3]];
    const Slot s4 = slot[i[4]], s5 = slot[i[5]], s6 = slot[i[6]], s7 = slot[i[7]];
    ++hits[s0], ++hits[s1], ++hits[s2], ++hits[s3];
    ++hits[s4], ++hits[s5], ++hits[s6], ++hits[s7];
  }
  if (start < rows) {
    const vu8 x = draws8(key_low, key_high, uint32_t(start));
    for (int64_t l = 0; l < rows - start; ++l) {
      ++hits[slot[(uint64_t(x[l]) * uint64_t(rows)) >> 32]];
    }
  }
}

typedef uint8_t vb16 __attribute__((vector_size(16)));
typedef uint16_t vh16 __attribute__((vector_size(32)));

// Draws one replicate, then in one sequential pass sums each cell's counters into
// cell_sums[c] and takes the dot product of counters and values (0 without values).
// Zeroes `hits` again.
template <typename Slot, bool kValues>
LORAFIT_INLINE double bootstrap_pass(uint64_t key, int64_t rows, const Slot* slot,
                                     const Layout& layout, uint8_t* hits, int64_t* cell_sums) {
  count_draws(key, rows, slot, hits);
  const double* values = layout.values.data();
  const Cell* cells = layout.cells.data();
  const int64_t num_cells = int64_t(layout.cells.size());
  vd4 dot0 = {}, dot1 = {}, dot2 = {}, dot3 = {};  // vd4, not vd8: stays in registers on AVX2
  for (int64_t c = 0; c < num_cells; ++c) {
    vi8 sum = {};
    for (int64_t k = cells[c].begin; k < cells[c].end; k += 16) {
      vb16 h;
      std::memcpy(&h, hits + k, sizeof h);
      const vh16 wide = __builtin_convertvector(h, vh16);
      const vi8 low = __builtin_convertvector(
          __builtin_shufflevector(wide, wide, 0, 1, 2, 3, 4, 5, 6, 7), vi8);
      const vi8 high = __builtin_convertvector(
          __builtin_shufflevector(wide, wide, 8, 9, 10, 11, 12, 13, 14, 15), vi8);
      sum += low + high;
      if (kValues) {
        vd4 v0, v1, v2, v3;
        std::memcpy(&v0, values + k, sizeof v0);
        std::memcpy(&v1, values + k + 4, sizeof v1);
        std::memcpy(&v2, values + k + 8, sizeof v2);
        std::memcpy(&v3, values + k + 12, sizeof v3);
        dot0 += __builtin_convertvector(__builtin_shufflevector(low, low, 0, 1, 2, 3), vd4) * v0;
        dot1 += __builtin_convertvector(__builtin_shufflevector(low, low, 4, 5, 6, 7), vd4) * v1;
        dot2 += __builtin_convertvector(__builtin_shufflevector(high, high, 0, 1, 2, 3), vd4) * v2;
        dot3 += __builtin_convertvector(__builtin_shufflevector(high, high, 4, 5, 6, 7), vd4) * v3;
      }
    }
    cell_sums[c] = int64_t(sum[0]) + sum[1] + sum[2] + sum[3] + sum[4] + sum[5] + sum[6] + sum[7];
  }
  std::memset(hits, 0, size_t(layout.slots));
  const vd4 d = (dot0 + dot1) + (dot2 + dot3);
  return (d[0] + d[1]) + (d[2] + d[3]);
}

LORAFIT_SIMD_DISPATCH
double bootstrap_pass16(uint64_t key, int64_t rows, const Layout& layout, bool with_values,
                        uint8_t* hits, int64_t* cell_sums) {
  const uint16_t* slot = layout.slot16.data();
  return with_values ? bootstrap_pass<uint16_t, true>(key, rows, slot, layout, hits, cell_sums)
                     : bootstrap_pass<uint16_t, false>(key, rows, slot, layout, hits, cell_sums);
}

LORAFIT_SIMD_DISPATCH
double bootstrap_pass32(uint64_t key, int64_t rows, const Layout& layout, bool with_values,
                        uint8_t* hits, int64_t* cell_sums) {
  const uint32_t* slot = layout.slot32.data();
  return with_values ? bootstrap_pass<uint32_t, true>(key, rows, slot, layout, hits, cell_sums)
                     : bootstrap_pass<uint32_t, false>(key, rows, slot, layout, hits, cell_sums);
}

// Builds the layout, or returns false when the fast path does not apply (many sparse cells
// would pad too much; a non-finite value would turn 0 * inf into NaN in the dot product).
bool make_layout(const int64_t* labels, const int64_t* preds, const double* values,
                 int64_t rows, int64_t num_classes, Layout& layout) {
  if (num_classes > 256) return false;
  if (values) {
    for (int64_t r = 0; r < rows; ++r) {
      if (!std::isfinite(values[r])) return false;
    }
  }
  const int64_t num_codes = num_classes * num_classes;
  std::vector<int64_t> next(num_codes, 0);  // row count, then next free slot, per code
  for (int64_t r = 0; r < rows; ++r) ++next[labels[r] * num_classes + preds[r]];
  int64_t slots = 0;
  for (int64_t code = 0; code < num_codes; ++code) {
    const int64_t size = next[code];
    if (size == 0) continue;
    next[code] = slots;
    layout.cells.push_back({code / num_classes, code % num_classes, slots, slots + (size + 15) / 16 * 16});
    slots = layout.cells.back().end;
  }
  slots = (slots + 31) / 32 * 32;
  if (slots > 2 * rows + 64 || slots > (int64_t(1) << 32)) return false;
  layout.slots = slots;
  const bool narrow = slots <= 65536;
  if (narrow) layout.slot16.resize(rows); else layout.slot32.resize(rows);
  if (values) layout.values.assign(slots, 0.0);
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t s = next[labels[r] * num_classes + preds[r]]++;
    if (narrow) layout.slot16[r] = uint16_t(s); else layout.slot32[r] = uint32_t(s);
    if (values) layout.values[s] = values[r];
  }
  return true;
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
  const Inputs in{labels,         preds_a,        preds_b, values,  codes_a.data(),
                  codes_b.data(), rows,           num_classes, seed, permute, joint};
  Layout layout;
  const bool fast = !permute && !preds_b &&
                    make_layout(labels, preds_a, values, rows, num_classes, layout);
  // Replicates are claimed one at a time from an atomic counter by plain threads that the
  // caller joins. Not an OpenMP team: on a shared, oversubscribed machine OpenMP's spinning
  // barrier burns the core that a descheduled worker needs, while join() sleeps.
  std::atomic<int64_t> next_replicate{0};
  auto work = [&] {
    Counts counts(num_classes, joint);
    std::vector<uint8_t> hits(fast ? layout.slots : 0, 0);
    std::vector<int64_t> cell_sums(layout.cells.size());
    for (int64_t b; (b = next_replicate.fetch_add(1, std::memory_order_relaxed)) < replicates;) {
      double* row = out + b * 5;
      if (!fast) {
        generic_replicate(in, b, counts, row);
        continue;
      }
      const uint64_t key = replicate_key(seed, b);
      const double dot =
          layout.slot16.empty()
              ? bootstrap_pass32(key, rows, layout, values, hits.data(), cell_sums.data())
              : bootstrap_pass16(key, rows, layout, values, hits.data(), cell_sums.data());
      std::vector<int64_t>& label = counts.label;
      std::vector<int64_t>& pred = counts.pred_a;
      std::vector<int64_t>& hit = counts.hit_a;
      std::fill(label.begin(), label.end(), 0);
      std::fill(pred.begin(), pred.end(), 0);
      std::fill(hit.begin(), hit.end(), 0);
      int64_t total = 0;
      for (size_t c = 0; c < cell_sums.size(); ++c) {
        const Cell& cell = layout.cells[c];
        label[cell.label] += cell_sums[c];
        pred[cell.pred] += cell_sums[c];
        if (cell.label == cell.pred) hit[cell.label] += cell_sums[c];
        total += cell_sums[c];
      }
      if (total != rows) {  // a byte counter wrapped (a row drawn 256+ times): redo exactly
        generic_replicate(in, b, counts, row);
        continue;
      }
      row[0] = accuracy(hit, rows);
      row[1] = macro_f1(label, pred, hit);
      row[2] = row[3] = kNaN;
      row[4] = values ? dot / double(rows) : kNaN;
    }
  };
  int64_t threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();  // the same thread count as the OpenMP kernels
#endif
  // About 1e5 draws per thread at least: starting a thread costs tens of microseconds.
  const int64_t draws = rows * std::min<int64_t>(replicates, int64_t(1) << 24);
  threads = std::max<int64_t>(1, std::min(threads, draws / 100000));
  std::vector<std::thread> workers;
  for (int64_t t = 1; t < threads; ++t) workers.emplace_back(work);
  work();
  for (std::thread& worker : workers) worker.join();
}

}  // namespace lorafit
