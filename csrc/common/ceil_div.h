// ceil_div: the number of blocks of b that cover a, for grid sizes, tile counts and shared-memory padding, on the
// host and in kernels alike. The result has the wider of the two operand types, so a 64-bit size divided by an int
// constant stays 64-bit and an int tile count stays an int (a 64-bit division costs a subroutine call on the GPU).
#pragma once

#include "common/checks.h"

#include <type_traits>

namespace charmlp {

template <typename A, typename B>
CHARMLP_HOST_DEVICE constexpr std::common_type_t<A, B> ceil_div(A a, B b) {
  return (a + b - 1) / b;
}

}  // namespace charmlp
