// Multi-scale deformable attention: what the CPU and CUDA kernels share.
//
// Legend (shapes, all tensors contiguous):
//   value               (N, S, M, D)        S = sum_l H_l * W_l
//   spatial_shapes      (L, 2) int64        (H_l, W_l)
//   level_start_index   (L,) int64          offset of level l in S
//   sampling_locations  (N, Lq, M, L, P, 2) (x, y) in [0, 1], acc_t
//   attention           (N, Lq, M, L, P)    weights, or logits that the kernel softmaxes over L * P
//   output              (N, Lq, M * D)
// acc_t is double for double values and float otherwise (fp32 accumulation for fp16 / bf16).
//
// Sampling follows grid_sample(mode="bilinear", padding_mode="zeros", align_corners=False): a location
// maps to the pixel coordinate x = loc_x * W - 0.5, and each of the four neighbouring pixels contributes
// only when it lies inside the map. The gradient with respect to the location is the derivative of that
// bilinear form, taken from the corners inside the map, exactly as grid_sample's backward.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <tuple>

#if defined(__CUDACC__)
#define MSDA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MSDA_HOST_DEVICE inline
#endif

namespace dino_kernels {

// The four pixels around one sampling point and the bilinear weights of the point inside them.
template <typename acc_t>
struct Corners {
  int x0, y0;                         // top-left pixel; x0 + 1 and y0 + 1 are the others
  acc_t fx, fy;                       // x - x0 and y - y0, in [0, 1)
  bool x0_in, x1_in, y0_in, y1_in;    // which columns / rows lie inside the map
};

// Fills `c` and returns true when at least one corner can lie inside an H x W map. A point with
// x < -1 or x >= W (same for y) touches no pixel; the comparisons are written so that NaN and
// infinite locations also return false before any float -> int conversion happens.
template <typename acc_t>
MSDA_HOST_DEVICE bool locate(acc_t loc_x, acc_t loc_y, int H, int W, Corners<acc_t>& c) {
  const acc_t x = loc_x * static_cast<acc_t>(W) - static_cast<acc_t>(0.5);
  const acc_t y = loc_y * static_cast<acc_t>(H) - static_cast<acc_t>(0.5);
  if (!(x >= static_cast<acc_t>(-1) && x < static_cast<acc_t>(W) && y >= static_cast<acc_t>(-1) &&
        y < static_cast<acc_t>(H))) {
    return false;
  }
  // floor() for x in [-1, W) without a libm call: truncation rounds towards zero.
  int xi = static_cast<int>(x);
  xi -= (static_cast<acc_t>(xi) > x);
  int yi = static_cast<int>(y);
  yi -= (static_cast<acc_t>(yi) > y);
  c.x0 = xi;
  c.y0 = yi;
  c.fx = x - static_cast<acc_t>(xi);
  c.fy = y - static_cast<acc_t>(yi);
  c.x0_in = xi >= 0;
  c.x1_in = xi + 1 < W;
  c.y0_in = yi >= 0;
  c.y1_in = yi + 1 < H;
  return true;
}

// Sizes of one call, read from the tensors' metadata.
struct Sizes {
  int64_t N, S, M, D, Lq, L, P;
};

// Checks ranks, sizes, dtypes and devices (metadata only: never reads device memory) and returns the
// sizes. `attention_name` names the fifth argument in messages.
inline Sizes check_inputs(const at::Tensor& value, const at::Tensor& spatial_shapes,
                          const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                          const at::Tensor& attention, const char* attention_name) {
  TORCH_CHECK(value.dim() == 4, "ms_deform_attn: value must be (N, S, M, D), got ", value.sizes());
  TORCH_CHECK(spatial_shapes.dim() == 2 && spatial_shapes.size(1) == 2,
              "ms_deform_attn: spatial_shapes must be (L, 2), got ", spatial_shapes.sizes());
  TORCH_CHECK(sampling_locations.dim() == 6 && sampling_locations.size(5) == 2,
              "ms_deform_attn: sampling_locations must be (N, Lq, M, L, P, 2), got ",
              sampling_locations.sizes());
  const Sizes s{value.size(0), value.size(1), value.size(2), value.size(3),
                sampling_locations.size(1), sampling_locations.size(3), sampling_locations.size(4)};
  TORCH_CHECK(level_start_index.dim() == 1 && level_start_index.size(0) == s.L,
              "ms_deform_attn: level_start_index must be (L,) = (", s.L, ",), got ",
              level_start_index.sizes());
  TORCH_CHECK(spatial_shapes.size(0) == s.L, "ms_deform_attn: spatial_shapes has ", spatial_shapes.size(0),
              " levels but sampling_locations has ", s.L);
  TORCH_CHECK(sampling_locations.size(0) == s.N && sampling_locations.size(2) == s.M,
              "ms_deform_attn: sampling_locations ", sampling_locations.sizes(), " does not match value ",
              value.sizes(), " in N or M");
  TORCH_CHECK(attention.dim() == 5 && attention.size(0) == s.N && attention.size(1) == s.Lq &&
                  attention.size(2) == s.M && attention.size(3) == s.L && attention.size(4) == s.P,
              "ms_deform_attn: ", attention_name, " must be (N, Lq, M, L, P) = (", s.N, ", ", s.Lq, ", ", s.M,
              ", ", s.L, ", ", s.P, "), got ", attention.sizes());
  // An empty batch or query set gives an empty output; an empty map, head, channel or point set is an error.
  TORCH_CHECK(s.S > 0 && s.M > 0 && s.D > 0 && s.L > 0 && s.P > 0,
              "ms_deform_attn: S, M, D, L and P must be positive: value ", value.sizes(),
              ", sampling_locations ", sampling_locations.sizes());
  const auto vt = value.scalar_type();
  TORCH_CHECK(vt == at::kFloat || vt == at::kHalf || vt == at::kBFloat16 || vt == at::kDouble,
              "ms_deform_attn: value must be float32, float16, bfloat16 or float64, got ", vt);
  const auto lt = vt == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(sampling_locations.scalar_type() == lt, "ms_deform_attn: sampling_locations must be ", lt,
              " for ", vt, " values, got ", sampling_locations.scalar_type());
  TORCH_CHECK(attention.scalar_type() == vt, "ms_deform_attn: ", attention_name, " must have value's dtype ",
              vt, ", got ", attention.scalar_type());
  TORCH_CHECK(spatial_shapes.scalar_type() == at::kLong && level_start_index.scalar_type() == at::kLong,
              "ms_deform_attn: spatial_shapes and level_start_index must be int64, got ",
              spatial_shapes.scalar_type(), " and ", level_start_index.scalar_type());
  const auto device = value.device();
  TORCH_CHECK(spatial_shapes.device() == device && level_start_index.device() == device &&
                  sampling_locations.device() == device && attention.device() == device,
              "ms_deform_attn: all tensors must be on value's device ", device);
  // The CUDA kernels index inside one batch element's value with 32-bit offsets (the batch offset and
  // everything indexed by query are 64-bit).
  TORCH_CHECK(s.S * s.M * s.D < (int64_t{1} << 31), "ms_deform_attn: one batch element of value has ",
              s.S * s.M * s.D, " elements; at most 2^31 - 1 are supported");
  return s;
}

inline void check_grad_output(const at::Tensor& grad_output, const at::Tensor& value, const Sizes& s) {
  TORCH_CHECK(grad_output.dim() == 3 && grad_output.size(0) == s.N && grad_output.size(1) == s.Lq &&
                  grad_output.size(2) == s.M * s.D,
              "ms_deform_attn_backward: grad_output must be (N, Lq, M * D) = (", s.N, ", ", s.Lq, ", ",
              s.M * s.D, "), got ", grad_output.sizes());
  TORCH_CHECK(grad_output.scalar_type() == value.scalar_type() && grad_output.device() == value.device(),
              "ms_deform_attn_backward: grad_output must be ", value.scalar_type(), " on ", value.device(),
              ", got ", grad_output.scalar_type(), " on ", grad_output.device());
}

// CPU kernels (ms_deform_attn_cpu.cpp); `attention_is_logits` selects the softmax-inside variant.
at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations, const at::Tensor& attention,
                                      bool attention_is_logits);

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention,
    bool attention_is_logits);

}  // namespace dino_kernels
