// The dino_kernels operator library: schemas and CPU implementations.
//
// Fake (meta) kernels and autograd formulas are registered from Python (kernels/ops.py) with
// torch.library.register_fake / register_autograd. The CUDA implementations live in a separate library
// (ms_deform_attn_cuda.cu) that only adds TORCH_LIBRARY_IMPL(dino_kernels, CUDA), so a CPU-only machine
// never needs nvcc and the CUDA library is built only where a GPU uses it.
#include "ms_deform_attn.h"

#include <torch/library.h>

namespace dino_kernels {
namespace {

at::Tensor forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                       const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                       const at::Tensor& attention_weights) {
  return ms_deform_attn_forward_cpu(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_weights, /*attention_is_logits=*/false);
}

at::Tensor forward_from_logits_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                   const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                   const at::Tensor& attention_logits) {
  return ms_deform_attn_forward_cpu(value, spatial_shapes, level_start_index, sampling_locations,
                                    attention_logits, /*attention_is_logits=*/true);
}

}  // namespace

TORCH_LIBRARY(dino_kernels, m) {
  m.def(
      "ms_deform_attn(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_weights) -> Tensor");
  m.def(
      "ms_deform_attn_from_logits(Tensor value, Tensor spatial_shapes, Tensor level_start_index, "
      "Tensor sampling_locations, Tensor attention_logits) -> Tensor");
  // Gradients of (value, sampling_locations, attention); `attention` holds weights, or logits when
  // attention_is_logits (then the third gradient is the logits').
  m.def(
      "ms_deform_attn_backward(Tensor grad_output, Tensor value, Tensor spatial_shapes, "
      "Tensor level_start_index, Tensor sampling_locations, Tensor attention, bool attention_is_logits) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(dino_kernels, CPU, m) {
  m.impl("ms_deform_attn", &forward_cpu);
  m.impl("ms_deform_attn_from_logits", &forward_from_logits_cpu);
  m.impl("ms_deform_attn_backward", &ms_deform_attn_backward_cpu);
}

}  // namespace dino_kernels
