// Fused CPU multi-scale deformable attention (forward and backward); shapes in ms_deform_attn.h.
//
// Forward: at::parallel_for over (batch, query); per head, the attention weights are read (or softmaxed)
// once, each point's corners and bilinear weights are computed once, and the four corner rows of D
// contiguous channels are accumulated into a head-sized fp32 (fp64) buffer that the compiler vectorises.
//
// Backward: at::parallel_for over (batch, head). A task owns value[n, :, m, :], so it scatters into
// grad_value without atomics or per-thread copies and the result does not depend on the thread count
// (deterministic by construction). The same pass produces the gradients of the locations and weights of
// its (batch, head), which no other task touches. Parallelism is N * M tasks (8 for DINO at batch 1),
// which covers the CPUs this kernel is meant for (CI, demos, small training runs).
#include "ms_deform_attn.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace dino_kernels {
namespace {

struct Level {
  int64_t H, W, start;
};

// Reads the level table. On the CPU it costs nothing to check it against value's S, and the kernels
// index value with it, so an inconsistent table is an error here rather than an out-of-bounds read.
std::vector<Level> read_levels(const at::Tensor& spatial_shapes, const at::Tensor& level_start_index,
                               int64_t S) {
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const int64_t* hw = shapes.data_ptr<int64_t>();
  const int64_t* start = starts.data_ptr<int64_t>();
  std::vector<Level> levels(static_cast<size_t>(shapes.size(0)));
  int64_t offset = 0;
  for (size_t l = 0; l < levels.size(); ++l) {
    const int64_t H = hw[2 * l], W = hw[2 * l + 1];
    TORCH_CHECK(H > 0 && W > 0, "ms_deform_attn: spatial_shapes[", l, "] = (", H, ", ", W, ") is empty");
    TORCH_CHECK(start[l] == offset, "ms_deform_attn: level_start_index[", l, "] = ", start[l],
                " but the levels before it hold ", offset, " positions");
    levels[l] = Level{H, W, offset};
    offset += H * W;
  }
  TORCH_CHECK(offset == S, "ms_deform_attn: value has S = ", S, " positions but spatial_shapes sums to ",
              offset);
  return levels;
}

// acc[c] += w * row[c] over D channels; DC > 0 makes D a compile-time constant for the common head sizes.
template <int DC, typename scalar_t, typename acc_t>
inline void axpy(int64_t D, acc_t w, const scalar_t* __restrict__ row, acc_t* __restrict__ acc) {
  const int64_t n = DC > 0 ? DC : D;
  for (int64_t c = 0; c < n; ++c) {
    acc[c] += w * static_cast<acc_t>(row[c]);
  }
}

// Without -ffast-math a compiler keeps a single running sum in order, which serialises the loop on the
// add latency; K independent lanes (one 512-bit register) and a tree at the end vectorise instead.
template <int DC, typename scalar_t, typename acc_t>
inline acc_t dot(int64_t D, const acc_t* __restrict__ a, const scalar_t* __restrict__ row) {
  constexpr int K = 64 / sizeof(acc_t);
  const int64_t n = DC > 0 ? DC : D;
  acc_t lanes[K] = {};
  int64_t c = 0;
  for (; c + K <= n; c += K) {
    for (int k = 0; k < K; ++k) lanes[k] += a[c + k] * static_cast<acc_t>(row[c + k]);
  }
  for (int k = 0; c < n; ++c, ++k) lanes[k] += a[c] * static_cast<acc_t>(row[c]);
  for (int width = K / 2; width > 0; width /= 2) {
    for (int k = 0; k < width; ++k) lanes[k] += lanes[k + width];
  }
  return lanes[0];
}

// weights[i] = attention[i] (converted), or softmax(attention) over the L * P points of one head.
template <bool LOGITS, typename scalar_t, typename acc_t>
inline void read_weights(const scalar_t* attention, int64_t LP, acc_t* weights) {
  if (!LOGITS) {
    for (int64_t i = 0; i < LP; ++i) weights[i] = static_cast<acc_t>(attention[i]);
    return;
  }
  acc_t top = static_cast<acc_t>(attention[0]);
  for (int64_t i = 1; i < LP; ++i) top = std::max(top, static_cast<acc_t>(attention[i]));
  acc_t total = 0;
  for (int64_t i = 0; i < LP; ++i) {
    weights[i] = std::exp(static_cast<acc_t>(attention[i]) - top);
    total += weights[i];
  }
  const acc_t inv = acc_t(1) / total;
  for (int64_t i = 0; i < LP; ++i) weights[i] *= inv;
}

template <typename scalar_t, int DC, bool LOGITS>
void forward_kernel(const scalar_t* value, const std::vector<Level>& levels,
                    const at::opmath_type<scalar_t>* loc, const scalar_t* attention, scalar_t* out,
                    const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = DC > 0 ? DC : s.D;
  const int64_t LP = s.L * s.P;
  const int64_t row = s.M * D;  // elements between neighbouring positions of one head
  // ~M * L * P * 4 * D multiply-adds per query: a few dozen queries amortise a task.
  at::parallel_for(0, s.N * s.Lq, 32, [&](int64_t begin, int64_t end) {
    // A fixed-size accumulator stays in vector registers; other head sizes use the heap buffer.
    acc_t fixed[DC > 0 ? DC : 1];
    std::vector<acc_t> dynamic(DC > 0 ? 0 : static_cast<size_t>(D)), weights(static_cast<size_t>(LP));
    acc_t* acc = DC > 0 ? fixed : dynamic.data();
    for (int64_t nq = begin; nq < end; ++nq) {
      const scalar_t* value_n = value + (nq / s.Lq) * s.S * row;
      for (int64_t m = 0; m < s.M; ++m) {
        const int64_t g = nq * s.M + m;
        const acc_t* loc_g = loc + g * LP * 2;
        read_weights<LOGITS>(attention + g * LP, LP, weights.data());
        std::fill(acc, acc + D, acc_t(0));
        for (int64_t l = 0; l < s.L; ++l) {
          const Level& lv = levels[l];
          const scalar_t* value_l = value_n + lv.start * row + m * D;
          for (int64_t p = 0; p < s.P; ++p) {
            const int64_t lp = l * s.P + p;
            Corners<acc_t> c;
            const int H = static_cast<int>(lv.H), W = static_cast<int>(lv.W);
            if (!locate(loc_g[2 * lp], loc_g[2 * lp + 1], H, W, c)) continue;
            const acc_t a = weights[lp];
            const acc_t wx0 = 1 - c.fx, wx1 = c.fx, wy0 = 1 - c.fy, wy1 = c.fy;
            auto add = [&](int x, int y, acc_t w) {
              axpy<DC>(D, a * w, value_l + (static_cast<int64_t>(y) * lv.W + x) * row, acc);
            };
            if (c.y0_in && c.x0_in) add(c.x0, c.y0, wx0 * wy0);
            if (c.y0_in && c.x1_in) add(c.x0 + 1, c.y0, wx1 * wy0);
            if (c.y1_in && c.x0_in) add(c.x0, c.y0 + 1, wx0 * wy1);
            if (c.y1_in && c.x1_in) add(c.x0 + 1, c.y0 + 1, wx1 * wy1);
          }
        }
        scalar_t* out_g = out + g * D;
        for (int64_t ch = 0; ch < D; ++ch) out_g[ch] = static_cast<scalar_t>(acc[ch]);
      }
    }
  });
}

template <typename scalar_t, int DC, bool LOGITS>
void backward_kernel(const scalar_t* grad_output, const scalar_t* value, const std::vector<Level>& levels,
                     const at::opmath_type<scalar_t>* loc, const scalar_t* attention,
                     at::opmath_type<scalar_t>* grad_value, at::opmath_type<scalar_t>* grad_loc,
                     scalar_t* grad_attention, const Sizes& s) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t D = DC > 0 ? DC : s.D;
  const int64_t LP = s.L * s.P;
  const int64_t row = s.M * D;
  at::parallel_for(0, s.N * s.M, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> gout(static_cast<size_t>(D));
    std::vector<acc_t> weights(static_cast<size_t>(LP)), gw(static_cast<size_t>(LP));
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / s.M, m = task % s.M;
      const scalar_t* value_nm = value + n * s.S * row + m * D;
      acc_t* grad_value_nm = grad_value + n * s.S * row + m * D;
      for (int64_t q = 0; q < s.Lq; ++q) {
        const int64_t g = (n * s.Lq + q) * s.M + m;
        const acc_t* loc_g = loc + g * LP * 2;
        acc_t* grad_loc_g = grad_loc + g * LP * 2;
        for (int64_t ch = 0; ch < D; ++ch) gout[ch] = static_cast<acc_t>(grad_output[g * D + ch]);
        read_weights<LOGITS>(attention + g * LP, LP, weights.data());
        for (int64_t l = 0; l < s.L; ++l) {
          const Level& lv = levels[l];
          for (int64_t p = 0; p < s.P; ++p) {
            const int64_t lp = l * s.P + p;
            acc_t ga = 0, gx = 0, gy = 0;
            Corners<acc_t> c;
            if (locate(loc_g[2 * lp], loc_g[2 * lp + 1], static_cast<int>(lv.H), static_cast<int>(lv.W), c)) {
              const acc_t a = weights[lp];
              const acc_t wx0 = 1 - c.fx, wx1 = c.fx, wy0 = 1 - c.fy, wy1 = c.fy;
              // One corner: its sample's dot with grad_output feeds the weight and location gradients,
              // and grad_output scaled by the corner's weight goes to its value row.
              auto corner = [&](int x, int y, acc_t w, acc_t dw_dx, acc_t dw_dy) {
                const int64_t offset = (lv.start + static_cast<int64_t>(y) * lv.W + x) * row;
                const acc_t d = dot<DC>(D, gout.data(), value_nm + offset);
                axpy<DC>(D, a * w, gout.data(), grad_value_nm + offset);
                ga += w * d;
                gx += dw_dx * d;
                gy += dw_dy * d;
              };
              if (c.y0_in && c.x0_in) corner(c.x0, c.y0, wx0 * wy0, -wy0, -wx0);
              if (c.y0_in && c.x1_in) corner(c.x0 + 1, c.y0, wx1 * wy0, wy0, -wx1);
              if (c.y1_in && c.x0_in) corner(c.x0, c.y0 + 1, wx0 * wy1, -wy1, wx0);
              if (c.y1_in && c.x1_in) corner(c.x0 + 1, c.y0 + 1, wx1 * wy1, wy1, wx1);
              gx *= a * static_cast<acc_t>(lv.W);
              gy *= a * static_cast<acc_t>(lv.H);
            }
            gw[lp] = ga;
            grad_loc_g[2 * lp] = gx;
            grad_loc_g[2 * lp + 1] = gy;
          }
        }
        if (LOGITS) {
          // d softmax: grad_logit_i = w_i * (grad_w_i - sum_j w_j grad_w_j)
          acc_t inner = 0;
          for (int64_t i = 0; i < LP; ++i) inner += weights[i] * gw[i];
          for (int64_t i = 0; i < LP; ++i) gw[i] = weights[i] * (gw[i] - inner);
        }
        scalar_t* grad_attention_g = grad_attention + g * LP;
        for (int64_t i = 0; i < LP; ++i) grad_attention_g[i] = static_cast<scalar_t>(gw[i]);
      }
    }
  });
}

// Calls f with D as a compile-time constant for the head sizes DINO and its debug configs use.
template <typename F>
void with_channels(int64_t D, const F& f) {
  switch (D) {
    case 16: f(std::integral_constant<int, 16>{}); break;
    case 32: f(std::integral_constant<int, 32>{}); break;
    case 64: f(std::integral_constant<int, 64>{}); break;
    default: f(std::integral_constant<int, 0>{}); break;
  }
}

}  // namespace

at::Tensor ms_deform_attn_forward_cpu(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                      const at::Tensor& level_start_index,
                                      const at::Tensor& sampling_locations, const at::Tensor& attention,
                                      bool attention_is_logits) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention,
                               attention_is_logits ? "attention_logits" : "attention_weights");
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn_forward_cpu: tensors must be on the CPU");
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, s.S);
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor att = attention.contiguous();
  at::Tensor out = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  const auto dtype = v.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ms_deform_attn_forward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_channels(s.D, [&](auto dc) {
      constexpr int DC = decltype(dc)::value;
      auto run = attention_is_logits ? forward_kernel<scalar_t, DC, true>  //
                                     : forward_kernel<scalar_t, DC, false>;
      run(v.data_ptr<scalar_t>(), levels, loc.data_ptr<acc_t>(), att.data_ptr<scalar_t>(),
          out.data_ptr<scalar_t>(), s);
    });
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ms_deform_attn_backward_cpu(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention,
    bool attention_is_logits) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention,
                               attention_is_logits ? "attention_logits" : "attention_weights");
  check_grad_output(grad_output, value, s);
  TORCH_CHECK(value.device().is_cpu(), "ms_deform_attn_backward_cpu: tensors must be on the CPU");
  const std::vector<Level> levels = read_levels(spatial_shapes, level_start_index, s.S);
  const at::Tensor gout = grad_output.contiguous();
  const at::Tensor v = value.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor att = attention.contiguous();
  // fp16 / bf16 value gradients are summed in fp32 and rounded once at the end.
  const auto acc_type = value.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor grad_value_acc = at::zeros(value.sizes(), value.options().dtype(acc_type));
  at::Tensor grad_loc = at::empty(loc.sizes(), loc.options());
  at::Tensor grad_attention = at::empty(att.sizes(), att.options());
  const auto dtype = v.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ms_deform_attn_backward_cpu", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    with_channels(s.D, [&](auto dc) {
      constexpr int DC = decltype(dc)::value;
      auto run = attention_is_logits ? backward_kernel<scalar_t, DC, true>  //
                                     : backward_kernel<scalar_t, DC, false>;
      run(gout.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), levels, loc.data_ptr<acc_t>(),
          att.data_ptr<scalar_t>(), grad_value_acc.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(),
          grad_attention.data_ptr<scalar_t>(), s);
    });
  });
  return {grad_value_acc.to(value.scalar_type()), grad_loc, grad_attention};
}

}  // namespace dino_kernels
