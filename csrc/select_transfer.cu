// CUDA implementation of genjo_fast::select_transfer: one thread block per row.
//
// The row's confidences are staged in shared memory (upcast to the comparison dtype: float32,
// or float64 for float64 input); each thread counts the ranks of its positions against the
// whole row (all threads read the same vals[j] at once: a shared-memory broadcast, no bank
// conflicts), the factor rule's first failing rank is an atomicMin in shared memory, and the
// mask is written once the block has synchronised. O(N^2 / threads) per row; N is a block
// length (typically 8..256, at most what fits in shared memory).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <type_traits>

#include "select_transfer.h"

namespace genjo_fast {

int check_select_transfer(const at::Tensor& confidence, const std::optional<at::Tensor>& num_transfer,
                          std::optional<double> threshold, std::optional<double> factor);

namespace {

template <typename scalar_t, typename acc_t>
__global__ void select_transfer_kernel(const scalar_t* __restrict__ conf, int64_t stride_b, int64_t stride_n,
                                       const int64_t* __restrict__ k, int rule, acc_t threshold, float factor,
                                       bool* __restrict__ out, int n) {
  extern __shared__ __align__(16) unsigned char smem[];
  acc_t* vals = reinterpret_cast<acc_t*>(smem);  // [n] the row, upcast
  int* ranks = reinterpret_cast<int*>(vals + n);  // [n]
  __shared__ int first_fail;
  const int64_t row = blockIdx.x;
  const scalar_t* src = conf + row * stride_b;
  for (int i = threadIdx.x; i < n; i += blockDim.x) vals[i] = static_cast<acc_t>(src[i * stride_n]);
  if (threadIdx.x == 0) first_fail = n;
  __syncthreads();

  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    const acc_t v = vals[i];
    int r = 0;
    for (int j = 0; j < n; ++j) r += precedes(vals[j], j, v, i);
    ranks[i] = r;
    if (rule == kFactor && factor_fails(v, r, factor)) atomicMin(&first_fail, r);
  }
  __syncthreads();

  const int64_t kk = rule == kTopK ? k[row] : 0;
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    out[row * n + i] = selected(rule, vals[i], static_cast<int64_t>(ranks[i]), kk, threshold,
                                static_cast<int64_t>(first_fail));
  }
}

at::Tensor select_transfer_cuda(const at::Tensor& confidence, const std::optional<at::Tensor>& num_transfer,
                                std::optional<double> threshold, std::optional<double> factor) {
  const int rule = check_select_transfer(confidence, num_transfer, threshold, factor);
  TORCH_CHECK(confidence.is_cuda(), "select_transfer (cuda): confidence must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(confidence.device());
  at::Tensor out = at::empty(confidence.sizes(), confidence.options().dtype(at::kBool));
  const int64_t batch = confidence.size(0), n = confidence.size(1);
  if (out.numel() == 0) return out;
  TORCH_CHECK(batch <= 2147483647, "select_transfer (cuda): batch ", batch, " exceeds the grid limit");
  at::Tensor k;
  if (rule == kTopK) k = num_transfer->to(at::kLong).contiguous();
  const int threads = static_cast<int>(std::min<int64_t>(1024, (n + 31) / 32 * 32));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, confidence.scalar_type(), "select_transfer_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const size_t smem = static_cast<size_t>(n) * (sizeof(acc_t) + sizeof(int));
    auto kernel = select_transfer_kernel<scalar_t, acc_t>;
    if (smem > 48 * 1024) {  // beyond the default: opt in to the device's larger limit
      int optin = 0;
      C10_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                            confidence.get_device()));
      TORCH_CHECK(smem <= static_cast<size_t>(optin), "select_transfer (cuda): num_pos ", n,
                  " needs ", smem, " bytes of shared memory, more than the device's ", optin);
      C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                          static_cast<int>(smem)));
    }
    // torch compares a tensor with a Python scalar in the tensor's dtype.
    const acc_t thr = static_cast<acc_t>(static_cast<scalar_t>(threshold.value_or(0.0)));
    kernel<<<static_cast<unsigned int>(batch), threads, smem, stream>>>(
        confidence.data_ptr<scalar_t>(), confidence.stride(0), confidence.stride(1),
        rule == kTopK ? k.data_ptr<int64_t>() : nullptr, rule, thr, static_cast<float>(factor.value_or(0.0)),
        out.data_ptr<bool>(), static_cast<int>(n));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(genjo_fast, CUDA, m) { m.impl("select_transfer", &select_transfer_cuda); }

}  // namespace genjo_fast
