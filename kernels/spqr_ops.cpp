// Torch binding of the SpQR v2 kernels (kernels/spqr_matmul.cu): checks every tensor's device, dtype, shape,
// contiguity and alignment, plans the split-K grid from the device's SM count and the kernel's occupancy, then
// calls the launchers on the current CUDA stream. No host sync.
// Python side: spqr_run/ops/ext.py builds this file, spqr_run/ops/spqr_matmul.py wraps it in torch.library ops.

#include <torch/extension.h>

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <utility>

#include "spqr_matmul.h"

namespace {

constexpr int64_t kTile = 16;
constexpr int64_t kRecordCols = 64;
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

// Validates the packed v2 tensors of one spqr linear (KERNELS_V2_SPEC.md section 2) and views them as a SpqrLayer.
SpqrLayer make_layer(const torch::Device& device, const torch::Tensor& tiles, const torch::Tensor& outliers,
                     const torch::Tensor& outlier_row_ptr, int64_t wbits, int64_t stat_bits, int64_t out_features,
                     int64_t in_features) {
  TORCH_CHECK(spqr_kernels_support(static_cast<int>(wbits), static_cast<int>(stat_bits)),
              "spqr: no kernel for wbits=", wbits, ", stat_bits=", stat_bits);
  TORCH_CHECK(out_features > 0 && out_features < (int64_t{1} << 30), "spqr: bad out_features ", out_features);
  TORCH_CHECK(in_features > 0 && in_features <= 65536, "spqr: in_features must be in 1..65536, got ", in_features);
  const int64_t row_tiles = (out_features + kTile - 1) / kTile;
  const int64_t kblocks = (in_features + kRecordCols - 1) / kRecordCols;
  const int64_t record_words = 32 * wbits + 4 * stat_bits + 8;
  check_tensor(tiles, "tiles", torch::kInt32, device);
  check_shape(tiles, "tiles", {row_tiles, kblocks, record_words});
  check_aligned(tiles, "tiles", 16);
  check_tensor(outliers, "outliers", torch::kInt32, device);
  TORCH_CHECK(outliers.dim() == 1, "spqr: outliers must be 1-d, got ", outliers.sizes());
  check_tensor(outlier_row_ptr, "outlier_row_ptr", torch::kInt32, device);
  check_shape(outlier_row_ptr, "outlier_row_ptr", {row_tiles * kTile + 1});
  SpqrLayer layer;
  layer.tiles = tiles.data_ptr<int32_t>();
  layer.outliers = outliers.data_ptr<int32_t>();
  layer.outlier_row_ptr = outlier_row_ptr.data_ptr<int32_t>();
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

// Ticket counters of the split-K reduction: one persistent zeroed buffer per (device, stream); every launch
// leaves it zeroed, so it is allocated (and memset) once, before any CUDA graph capture that reuses it.
torch::Tensor counters_for(const torch::Device& device, cudaStream_t stream, int64_t needed) {
  static std::mutex mutex;
  static std::map<std::pair<int, cudaStream_t>, torch::Tensor> buffers;
  const std::lock_guard<std::mutex> lock(mutex);
  torch::Tensor& buf = buffers[{device.index(), stream}];
  if (!buf.defined() || buf.numel() < needed) {
    buf = torch::zeros({std::max<int64_t>(needed, 4096)}, torch::dtype(torch::kInt32).device(device));
  }
  return buf;
}

// Resident blocks per SM of the small kernel, per (wbits, stat_bits, n-tiles) and device (occupancy calculator).
int blocks_per_sm(int device, int wbits, int stat_bits, int rows) {
  static std::mutex mutex;
  static std::map<std::tuple<int, int, int, int>, int> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_tuple(device, wbits, stat_bits, rows <= 8 ? 1 : 2);
  auto it = cache.find(key);
  if (it == cache.end()) it = cache.emplace(key, spqr_matmul_small_blocks_per_sm(wbits, stat_bits, rows)).first;
  return it->second;
}

// y (rows, out) for x_stored (rows, in) holding 1..16 rows in stored column order.
torch::Tensor matmul_small(const torch::Tensor& x, const torch::Tensor& tiles, const torch::Tensor& outliers,
                           const torch::Tensor& outlier_row_ptr, const std::optional<torch::Tensor>& bias,
                           int64_t wbits, int64_t stat_bits, int64_t out_features, int64_t in_features) {
  check_input(x, in_features);
  TORCH_CHECK(x.dim() == 2, "spqr.matmul_small: x_stored must be (rows, in), got ", x.sizes());
  const int64_t rows = x.size(0);
  TORCH_CHECK(rows >= 1 && rows <= kMaxSmallRows, "spqr.matmul_small: x must hold 1..16 rows, got ", rows);
  const c10::cuda::CUDAGuard guard(x.device());
  const SpqrLayer layer =
      make_layer(x.device(), tiles, outliers, outlier_row_ptr, wbits, stat_bits, out_features, in_features);
  const SpqrBias b = make_bias(bias, x.device(), out_features);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  int num_sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, x.device().index()));
  const SpqrSmallPlan plan = spqr_matmul_small_plan(
      layer, num_sms, blocks_per_sm(x.device().index(), layer.wbits, layer.stat_bits, static_cast<int>(rows)));
  torch::Tensor workspace, counters;
  if (plan.splits > 1) {
    workspace = torch::empty({static_cast<int64_t>(plan.workspace_floats)}, x.options().dtype(torch::kFloat));
    counters = counters_for(x.device(), stream, plan.counters);
  }
  // The kernel reads x in 16-byte chunks of whole records: pad rows to a multiple of 64 halves with zeros (or
  // realign) when needed. Every LLaMA/Falcon width is a multiple of 64: no copy there.
  torch::Tensor xk = x;
  int64_t ldx = in_features;
  if (in_features % kRecordCols != 0 || reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 != 0) {
    ldx = (in_features + kRecordCols - 1) / kRecordCols * kRecordCols;
    xk = torch::constant_pad_nd(x, {0, ldx - in_features}, 0);
  }
  torch::Tensor y = torch::empty({rows, out_features}, x.options());
  C10_CUDA_CHECK(spqr_matmul_small(layer, reinterpret_cast<const __half*>(xk.data_ptr()), static_cast<int>(ldx),
                                   static_cast<int>(rows), b,
                                   reinterpret_cast<__half*>(y.data_ptr()), plan,
                                   plan.splits > 1 ? workspace.data_ptr<float>() : nullptr,
                                   plan.splits > 1 ? counters.data_ptr<int32_t>() : nullptr, stream));
  return y;
}

// W (out, in) fp16 in stored (permuted) column order, outliers included.
torch::Tensor dequantize(const torch::Tensor& tiles, const torch::Tensor& outliers,
                         const torch::Tensor& outlier_row_ptr, int64_t wbits, int64_t stat_bits, int64_t out_features,
                         int64_t in_features) {
  TORCH_CHECK(tiles.is_cuda(), "spqr.dequantize: tiles must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(tiles.device());
  const SpqrLayer layer =
      make_layer(tiles.device(), tiles, outliers, outlier_row_ptr, wbits, stat_bits, out_features, in_features);
  torch::Tensor w = torch::empty({out_features, in_features}, tiles.options().dtype(torch::kHalf));
  C10_CUDA_CHECK(
      spqr_dequantize(layer, reinterpret_cast<__half*>(w.data_ptr()), c10::cuda::getCurrentCUDAStream()));
  return w;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "SpQR matmul kernels (see kernels/spqr_matmul.cu)";
  m.def("matmul_small", &matmul_small, "SpQR y = x_stored @ W^T (+ bias) for 1..16 fp16 rows (stored order)");
  m.def("dequantize", &dequantize, "SpQR weight (out, in) fp16, stored column order");
  m.def("supports", &spqr_kernels_support, "whether (wbits, stat_bits) has compiled kernels");
}
