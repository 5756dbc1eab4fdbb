// Host-side controls of the CUDA execution shim runtime (shim_runtime.cpp), used by the C API (shim_api.cpp).
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

namespace cuda_shim {

// Order in which a scheduler pass visits a block's threads (and the grid's blocks): forward, reverse, or a
// permutation drawn from `seed` anew for every pass (blocks stay in forward order).
enum class Order : int { Forward = 0, Reverse = 1, Random = 2 };

struct Config {
  Order order = Order::Forward;
  uint64_t seed = 0;
};

void configure(const Config& config);
// Text of the last failed launch ("" after a successful one).
const std::string& last_error_text();
void clear_last_error();
// Bytes of __shared__ variables the runtime found (and poisons before each block).
size_t shared_memory_bytes();

// Names the buffer an address belongs to or borders, for the message of an invalid access ("" when unknown).
using AddressDescriber = std::string (*)(const void* addr);
void set_address_describer(AddressDescriber describer);

}  // namespace cuda_shim
