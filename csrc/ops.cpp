// genjo_fast._C: the op schemas (torch.library) and their CPU implementations.
//
// The CUDA implementations live in select_transfer.cu; the fake (meta) implementations, used by
// torch.compile and FakeTensorMode, are registered from Python (genjo_fast/cuda_ext.py).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <optional>
#include <type_traits>
#include <vector>

#include "select_transfer.h"

namespace genjo_fast {

// Validates the arguments shared by every device; returns the rule.
int check_select_transfer(const at::Tensor& confidence, const std::optional<at::Tensor>& num_transfer,
                          std::optional<double> threshold, std::optional<double> factor) {
  const int rules = num_transfer.has_value() + threshold.has_value() + factor.has_value();
  TORCH_CHECK(rules == 1, "select_transfer takes exactly one of num_transfer, threshold, factor");
  TORCH_CHECK(confidence.dim() == 2, "select_transfer: confidence must have shape (batch, positions), got ",
              confidence.sizes());
  const auto dtype = confidence.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf || dtype == at::kBFloat16,
              "select_transfer: confidence dtype must be float16, bfloat16, float32 or float64, got ", dtype);
  if (num_transfer.has_value()) {
    const at::Tensor& k = *num_transfer;
    TORCH_CHECK(!at::isFloatingType(k.scalar_type()) && !at::isComplexType(k.scalar_type()) &&
                    k.scalar_type() != at::kBool,
                "select_transfer: num_transfer must be an integer tensor, got ", k.scalar_type());
    TORCH_CHECK(k.dim() == 1 && k.size(0) == confidence.size(0), "select_transfer: num_transfer shape ",
                k.sizes(), " must be (batch,) = (", confidence.size(0), ",)");
    TORCH_CHECK(k.device() == confidence.device(), "select_transfer: num_transfer is on ", k.device(),
                " but confidence is on ", confidence.device());
    return kTopK;
  }
  return threshold.has_value() ? kThreshold : kFactor;
}

namespace {

template <typename scalar_t, typename acc_t>
void select_rows_cpu(const at::Tensor& confidence, const int64_t* k, int rule, double threshold, float factor,
                     at::Tensor& out) {
  const int64_t batch = confidence.size(0), n = confidence.size(1);
  const scalar_t* conf = confidence.data_ptr<scalar_t>();
  const int64_t stride_b = confidence.stride(0), stride_n = confidence.stride(1);
  bool* dst = out.data_ptr<bool>();
  // torch compares a tensor with a Python scalar in the tensor's dtype.
  const acc_t thr = static_cast<acc_t>(static_cast<scalar_t>(threshold));
  std::vector<acc_t> vals(n);
  std::vector<int64_t> ranks(n);
  for (int64_t row = 0; row < batch; ++row) {
    for (int64_t i = 0; i < n; ++i) vals[i] = static_cast<acc_t>(conf[row * stride_b + i * stride_n]);
    int64_t first_fail = n;
    for (int64_t i = 0; i < n; ++i) {
      int64_t r = 0;
      for (int64_t j = 0; j < n; ++j) r += precedes(vals[j], j, vals[i], i);
      ranks[i] = r;
      if (rule == kFactor && factor_fails(vals[i], r, factor)) first_fail = std::min(first_fail, r);
    }
    const int64_t kk = rule == kTopK ? k[row] : 0;
    for (int64_t i = 0; i < n; ++i) dst[row * n + i] = selected(rule, vals[i], ranks[i], kk, thr, first_fail);
  }
}

// CPU statement of the op: O(N^2) rank counting per row, the same rules as the CUDA kernel (a
// reference for the CUDA code path; genjo_fast's torch backend is faster on CPU).
at::Tensor select_transfer_cpu(const at::Tensor& confidence, const std::optional<at::Tensor>& num_transfer,
                               std::optional<double> threshold, std::optional<double> factor) {
  const int rule = check_select_transfer(confidence, num_transfer, threshold, factor);
  at::Tensor out = at::empty(confidence.sizes(), confidence.options().dtype(at::kBool));
  if (out.numel() == 0) return out;
  at::Tensor k;
  if (rule == kTopK) k = num_transfer->to(at::kLong).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, confidence.scalar_type(), "select_transfer_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    select_rows_cpu<scalar_t, acc_t>(confidence, rule == kTopK ? k.data_ptr<int64_t>() : nullptr, rule,
                                     threshold.value_or(0.0), static_cast<float>(factor.value_or(0.0)), out);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(genjo_fast, m) {
  m.def("select_transfer(Tensor confidence, Tensor? num_transfer=None, float? threshold=None, "
        "float? factor=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(genjo_fast, CPU, m) { m.impl("select_transfer", &select_transfer_cpu); }

}  // namespace genjo_fast

extern "C" {
// An empty Python module: importing genjo_fast._C loads this library, whose static
// initializers (TORCH_LIBRARY above) register the ops with torch.ops.genjo_fast.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
