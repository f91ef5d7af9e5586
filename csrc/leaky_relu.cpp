// at::leaky_relu with a slope, which tch (0.24 to 0.26) does not expose (its binding drops the scalar
// argument). The alternative in tch, prelu with a constant weight, computes a full-size weight
// gradient in every backward pass and made our training step up to 16% slower than PyTorch's
// (docs/BENCHMARKS.md). Same calling convention as tch's own C wrapper: tensors are
// heap-allocated at::Tensor handles; nullptr signals an error.
#include <ATen/ATen.h>

extern "C" at::Tensor *plankton_leaky_relu(const at::Tensor *x, double slope) {
  try {
    return new at::Tensor(at::leaky_relu(*x, slope));
  } catch (...) {
    return nullptr;
  }
}
