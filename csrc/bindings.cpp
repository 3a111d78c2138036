// pybind11 bindings only: argument checks that protect memory, then a GIL-free call.
// Input validation with user-facing messages lives in lorafit/metrics (Python).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <stdexcept>
#include <string>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "kernels.h"

namespace py = pybind11;
using lorafit::DType;

namespace {

template <typename T>
using Array = py::array_t<T, py::array::c_style>;  // no forcecast: wrong dtypes raise

void require(bool ok, const std::string& message) {
  if (!ok) throw std::invalid_argument(message);
}

// Every label (and prediction) indexes memory in the kernels: one outside [0, limit) would
// read or write out of bounds. `skip` (token ignore_index) is allowed as well.
void require_ids(const Array<int64_t>& ids, int64_t limit, const char* what,
                 std::optional<int64_t> skip = std::nullopt) {
  const int64_t* data = ids.data();
  for (int64_t i = 0; i < ids.size(); ++i) {
    const int64_t id = data[i];
    if ((id < 0 || id >= limit) && !(skip && id == *skip)) {
      throw std::invalid_argument(std::string(what) + "[" + std::to_string(i) + "] = " +
                                  std::to_string(id) + " is outside 0.." +
                                  std::to_string(limit - 1));
    }
  }
}

DType logits_dtype(const py::array& logits, int code) {
  require(code >= 0 && code <= 3, "dtype code must be 0..3");
  const DType dtype = static_cast<DType>(code);
  require(logits.itemsize() == lorafit::dtype_size(dtype), "logits itemsize does not match dtype");
  require(logits.flags() & py::array::c_style, "logits must be C-contiguous");
  require(logits.ndim() == 2, "logits must be 2-D");
  return dtype;
}

py::tuple token_stats(const py::array& logits, int dtype_code, const Array<int64_t>& labels,
                      int64_t ignore_index) {
  const DType dtype = logits_dtype(logits, dtype_code);
  const int64_t rows = logits.shape(0), vocab = logits.shape(1);
  require(labels.ndim() == 1 && labels.shape(0) == rows, "labels must be [rows]");
  require_ids(labels, vocab, "labels", ignore_index);
  Array<double> nll(rows);
  Array<int64_t> rank(rows);
  int64_t first_nan_row;
  {
    py::gil_scoped_release release;
    first_nan_row = lorafit::token_stats(logits.data(), dtype, rows, vocab, labels.data(),
                                         ignore_index, nll.mutable_data(), rank.mutable_data());
  }
  return py::make_tuple(nll, rank, first_nan_row);
}

int64_t classification_update(const py::array& logits, int dtype_code,
                              const Array<int64_t>& labels, Array<int64_t> confusion,
                              Array<int64_t> ece_count, Array<double> ece_conf_sum,
                              Array<int64_t> ece_correct, Array<double> sums,
                              Array<int64_t> counts, std::optional<Array<float>> scores) {
  const DType dtype = logits_dtype(logits, dtype_code);
  const int64_t rows = logits.shape(0), num_classes = logits.shape(1);
  const int64_t bins = ece_count.size();
  require(labels.ndim() == 1 && labels.shape(0) == rows, "labels must be [rows]");
  require_ids(labels, num_classes, "labels");
  require(confusion.size() == num_classes * num_classes, "confusion must be [C, C]");
  require(bins > 0 && ece_conf_sum.size() == bins && ece_correct.size() == bins,
          "ECE arrays must share one length");
  require(sums.size() == 2 && counts.size() == 2, "sums and counts must have 2 entries");
  if (scores) {
    const int64_t width = num_classes == 2 ? 1 : num_classes;
    require(scores->size() == rows * width, "scores must be [rows] (C=2) or [C, rows]");
  }
  lorafit::ClassificationState state{num_classes,
                                     bins,
                                     confusion.mutable_data(),
                                     ece_count.mutable_data(),
                                     ece_conf_sum.mutable_data(),
                                     ece_correct.mutable_data(),
                                     sums.mutable_data(),
                                     counts.mutable_data()};
  float* scores_out = scores ? scores->mutable_data() : nullptr;
  py::gil_scoped_release release;
  return lorafit::classification_update(logits.data(), dtype, rows, labels.data(), state,
                                        scores_out);
}

py::tuple rank_metrics(const Array<int64_t>& labels, const Array<float>& scores) {
  const int64_t rows = labels.size();
  require(scores.ndim() == 1 || scores.ndim() == 2, "scores must be [rows] or [C, rows]");
  const int64_t columns = scores.ndim() == 1 ? 1 : scores.shape(0);
  require(scores.shape(scores.ndim() - 1) == rows, "scores must be [rows] or [C, rows]");
  Array<double> auroc(columns), average_precision(columns);
  {
    py::gil_scoped_release release;
    lorafit::rank_metrics(labels.data(), scores.data(), rows, columns, auroc.mutable_data(),
                          average_precision.mutable_data());
  }
  return py::make_tuple(auroc, average_precision);
}

Array<double> resample_stats(const Array<int64_t>& labels, const Array<int64_t>& preds_a,
                             std::optional<Array<int64_t>> preds_b,
                             std::optional<Array<double>> values, int64_t num_classes,
                             int64_t replicates, uint64_t seed, bool permute) {
  const int64_t rows = labels.size();
  require(rows > 0 && rows < (int64_t(1) << 32), "need 1 <= rows < 2^32");
  require(preds_a.size() == rows, "preds_a must match labels");
  require(!preds_b || preds_b->size() == rows, "preds_b must match labels");
  require(!values || values->size() == rows, "values must match labels");
  require(replicates > 0 && num_classes > 0, "replicates and num_classes must be positive");
  require_ids(labels, num_classes, "labels");
  require_ids(preds_a, num_classes, "preds_a");
  if (preds_b) require_ids(*preds_b, num_classes, "preds_b");
  Array<double> out({replicates, int64_t(5)});
  const int64_t* b = preds_b ? preds_b->data() : nullptr;
  const double* v = values ? values->data() : nullptr;
  double* o = out.mutable_data();
  {
    py::gil_scoped_release release;
    lorafit::resample_stats(labels.data(), preds_a.data(), b, v, rows, num_classes, replicates,
                            seed, permute, o);
  }
  return out;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "lorafit evaluation core (C++ kernels; use lorafit.metrics instead)";
  m.def("token_stats", &token_stats, py::arg("logits"), py::arg("dtype_code"),
        py::arg("labels"), py::arg("ignore_index"));
  m.def("classification_update", &classification_update, py::arg("logits"),
        py::arg("dtype_code"), py::arg("labels"), py::arg("confusion"), py::arg("ece_count"),
        py::arg("ece_conf_sum"), py::arg("ece_correct"), py::arg("sums"), py::arg("counts"),
        py::arg("scores"));
  m.def("rank_metrics", &rank_metrics, py::arg("labels"), py::arg("scores"));
  m.def("resample_stats", &resample_stats, py::arg("labels"), py::arg("preds_a"),
        py::arg("preds_b"), py::arg("values"), py::arg("num_classes"), py::arg("replicates"),
        py::arg("seed"), py::arg("permute"));
  m.def("max_threads", &max_threads, "OpenMP threads the kernels use");
}
