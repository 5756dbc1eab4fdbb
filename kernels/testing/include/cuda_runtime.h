// The CUDA execution shim's <cuda_runtime.h> (kernels/testing/cuda_shim.h): the few runtime API names the
// kernel sources use. Error codes and the stream type come from the toolkit's driver_types.h.
#pragma once

#include <driver_types.h>

namespace cuda_shim {
// The error of the last launch on this host thread (cudaSuccess, or cudaErrorLaunchFailure after a diagnostic,
// whose text shim_last_error() returns), cleared by reading it like cudaGetLastError.
cudaError_t take_last_error();
}  // namespace cuda_shim

inline cudaError_t cudaGetLastError() { return cuda_shim::take_last_error(); }
