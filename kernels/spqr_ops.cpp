// Torch binding of the SpQR matmul kernels (kernels/spqr_matmul.cu): checks every tensor's device, dtype,
// shape, contiguity and alignment, then calls the launchers on the current CUDA stream. No host sync.
// Python side: spqr_run/ops/ext.py builds this file, spqr_run/ops/spqr_matmul.py wraps it in torch.library ops.

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <optional>

#include "spqr_matmul.h"

namespace {

constexpr int64_t kTile = 16;
constexpr int64_t kMaxSmallRows = 16;

void check_tensor(const torch::Tensor& t, const char* name, torch::ScalarType dtype, const torch::Device& device) {
  TORCH_CHECK(t.device() == device, "spqr: ", name, " is on ", t.device(), ", expected ", device);
  TORCH_CHECK(t.scalar_type() == dtype, "spqr: ", name, " has dtype ", t.scalar_type(), ", expected ", dtype);
  TORCH_CHECK(t.is_contiguous(), "spqr: ", name, " must be contiguous");
}

void check_shape(const torch::Tensor& t, const char* name, c10::IntArrayRef shape) {
  TORCH_CHECK(t.sizes() == shape, "spqr: ", name, " has shape ", t.sizes(), ", expected ", shape);
}

void check_aligned(const torch::Tensor& t, const char* name, int64_t bytes) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0, "spqr: ", name, " must be ", bytes,
              "-byte aligned");
}

// Validates the packed tensors of one spqr linear (docs/FORMAT.md) and views them as a SpqrLayer.
SpqrLayer make_layer(const torch::Device& device, const torch::Tensor& codes, const torch::Tensor& stats,
                     const torch::Tensor& second, const torch::Tensor& outlier_values,
                     const torch::Tensor& outlier_cols, const torch::Tensor& outlier_row_ptr,
                     const std::optional<torch::Tensor>& perm, int64_t wbits, int64_t stat_bits,
                     int64_t out_features, int64_t in_features) {
  TORCH_CHECK(spqr_kernels_support(static_cast<int>(wbits), static_cast<int>(stat_bits)),
              "spqr: no kernel for wbits=", wbits, ", stat_bits=", stat_bits);
  TORCH_CHECK(out_features > 0 && out_features < (int64_t{1} << 30), "spqr: bad out_features ", out_features);
  TORCH_CHECK(in_features > 0 && in_features <= 65536, "spqr: in_features must be in 1..65536, got ", in_features);
  const int64_t row_tiles = (out_features + kTile - 1) / kTile;
  const int64_t col_tiles = (in_features + kTile - 1) / kTile;
  check_tensor(codes, "codes", torch::kInt32, device);
  check_shape(codes, "codes", {row_tiles, col_tiles, 8 * wbits});
  check_aligned(codes, "codes", 16);
  check_tensor(stats, "stats", torch::kInt32, device);
  check_shape(stats, "stats", {row_tiles, col_tiles, stat_bits});
  check_tensor(second, "second", torch::kHalf, device);
  check_shape(second, "second", {row_tiles, col_tiles, 4});
  check_aligned(second, "second", 8);
  check_tensor(outlier_values, "outlier_values", torch::kHalf, device);
  check_tensor(outlier_cols, "outlier_cols", torch::kInt16, device);
  TORCH_CHECK(outlier_values.dim() == 1 && outlier_cols.dim() == 1 &&
                  outlier_values.numel() == outlier_cols.numel(),
              "spqr: outlier_values and outlier_cols must be 1-d of equal length");
  check_tensor(outlier_row_ptr, "outlier_row_ptr", torch::kInt32, device);
  check_shape(outlier_row_ptr, "outlier_row_ptr", {out_features + 1});
  const uint16_t* perm_ptr = nullptr;
  if (perm.has_value()) {
    check_tensor(*perm, "perm", torch::kInt16, device);
    check_shape(*perm, "perm", {in_features});
    perm_ptr = reinterpret_cast<const uint16_t*>(perm->data_ptr());
  }
  SpqrLayer layer;
  layer.codes = codes.data_ptr<int32_t>();
  layer.stats = stats.data_ptr<int32_t>();
  layer.second = reinterpret_cast<const __half*>(second.data_ptr());
  layer.outlier_values = reinterpret_cast<const __half*>(outlier_values.data_ptr());
  layer.outlier_cols = reinterpret_cast<const uint16_t*>(outlier_cols.data_ptr());
  layer.outlier_row_ptr = outlier_row_ptr.data_ptr<int32_t>();
  layer.perm = perm_ptr;
  layer.out_features = static_cast<int>(out_features);
  layer.in_features = static_cast<int>(in_features);
  layer.wbits = static_cast<int>(wbits);
  layer.stat_bits = static_cast<int>(stat_bits);
  return layer;
}

SpqrBias make_bias(const std::optional<torch::Tensor>& bias, const torch::Device& device, int64_t out_features) {
  SpqrBias b{nullptr, nullptr};
  if (!bias.has_value()) return b;
  TORCH_CHECK(bias->device() == device, "spqr: bias is on ", bias->device(), ", expected ", device);
  TORCH_CHECK(bias->is_contiguous(), "spqr: bias must be contiguous");
  check_shape(*bias, "bias", {out_features});
  if (bias->scalar_type() == torch::kHalf) {
    b.f16 = reinterpret_cast<const __half*>(bias->data_ptr());
  } else {
    TORCH_CHECK(bias->scalar_type() == torch::kFloat, "spqr: bias must be float16 or float32, got ",
                bias->scalar_type());
    b.f32 = bias->data_ptr<float>();
  }
  return b;
}

void check_input(const torch::Tensor& x, int64_t in_features) {
  TORCH_CHECK(x.is_cuda(), "spqr: x must be a CUDA tensor");
  TORCH_CHECK(x.scalar_type() == torch::kHalf, "spqr: x must be float16, got ", x.scalar_type());
  TORCH_CHECK(x.is_contiguous(), "spqr: x must be contiguous");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "spqr: x must be (..., ", in_features, "), got ",
              x.sizes());
}

std::vector<int64_t> output_shape(const torch::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

// y (..., out) for x (..., in) holding exactly one row.
torch::Tensor matvec(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& stats,
                     const torch::Tensor& second, const torch::Tensor& outlier_values,
                     const torch::Tensor& outlier_cols, const torch::Tensor& outlier_row_ptr,
                     const std::optional<torch::Tensor>& perm, const std::optional<torch::Tensor>& bias,
                     int64_t wbits, int64_t stat_bits, int64_t out_features, int64_t in_features) {
  check_input(x, in_features);
  TORCH_CHECK(x.numel() == in_features, "spqr.matvec: x must hold one row, got ", x.sizes());
  const c10::cuda::CUDAGuard guard(x.device());
  const SpqrLayer layer = make_layer(x.device(), codes, stats, second, outlier_values, outlier_cols,
                                     outlier_row_ptr, perm, wbits, stat_bits, out_features, in_features);
  const SpqrBias b = make_bias(bias, x.device(), out_features);
  torch::Tensor y = torch::empty(output_shape(x, out_features), x.options());
  C10_CUDA_CHECK(spqr_matvec(layer, reinterpret_cast<const __half*>(x.data_ptr()), b,
                             reinterpret_cast<__half*>(y.data_ptr()), c10::cuda::getCurrentCUDAStream()));
  return y;
}

// y (..., out) for x (..., in) holding 1..16 rows; each weight tile is decoded once for all rows.
torch::Tensor matmul_small(const torch::Tensor& x, const torch::Tensor& codes, const torch::Tensor& stats,
                           const torch::Tensor& second, const torch::Tensor& outlier_values,
                           const torch::Tensor& outlier_cols, const torch::Tensor& outlier_row_ptr,
                           const std::optional<torch::Tensor>& perm, const std::optional<torch::Tensor>& bias,
                           int64_t wbits, int64_t stat_bits, int64_t out_features, int64_t in_features) {
  check_input(x, in_features);
  const int64_t rows = x.numel() / in_features;
  TORCH_CHECK(rows >= 1 && rows <= kMaxSmallRows, "spqr.matmul_small: x must hold 1..16 rows, got ", rows);
  const c10::cuda::CUDAGuard guard(x.device());
  const SpqrLayer layer = make_layer(x.device(), codes, stats, second, outlier_values, outlier_cols,
                                     outlier_row_ptr, perm, wbits, stat_bits, out_features, in_features);
  const SpqrBias b = make_bias(bias, x.device(), out_features);
  torch::Tensor y = torch::empty(output_shape(x, out_features), x.options());
  C10_CUDA_CHECK(spqr_matmul_small(layer, reinterpret_cast<const __half*>(x.data_ptr()), static_cast<int>(rows), b,
                                   reinterpret_cast<__half*>(y.data_ptr()), c10::cuda::getCurrentCUDAStream()));
  return y;
}

// W (out, in) fp16 in stored (permuted) column order, outliers included.
torch::Tensor dequantize(const torch::Tensor& codes, const torch::Tensor& stats, const torch::Tensor& second,
                         const torch::Tensor& outlier_values, const torch::Tensor& outlier_cols,
                         const torch::Tensor& outlier_row_ptr, int64_t wbits, int64_t stat_bits,
                         int64_t out_features, int64_t in_features) {
  TORCH_CHECK(codes.is_cuda(), "spqr.dequantize: codes must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(codes.device());
  const SpqrLayer layer = make_layer(codes.device(), codes, stats, second, outlier_values, outlier_cols,
                                     outlier_row_ptr, std::nullopt, wbits, stat_bits, out_features, in_features);
  torch::Tensor w = torch::empty({out_features, in_features}, second.options());
  C10_CUDA_CHECK(
      spqr_dequantize(layer, reinterpret_cast<__half*>(w.data_ptr()), c10::cuda::getCurrentCUDAStream()));
  return w;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SpQR matmul kernels (see kernels/spqr_matmul.cu)";
  m.def("matvec", &matvec, "SpQR y = W @ x[perm] (+ bias) for one fp16 row");
  m.def("matmul_small", &matmul_small, "SpQR y = x[:, perm] @ W^T (+ bias) for 1..16 fp16 rows");
  m.def("dequantize", &dequantize, "SpQR weight (out, in) fp16, stored column order");
  m.def("supports", &spqr_kernels_support, "whether (wbits, stat_bits) has compiled kernels");
}
