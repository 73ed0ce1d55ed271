// Fused CUDA multi-scale deformable attention (forward and backward); shapes in ms_deform_attn.h.
//
// Design (written for DINO's shapes: M = 8 heads, D = 32 channels, L = 4-5 levels, P = 4 points, tens of
// thousands of queries; tuned for sm_80 / sm_90, correct on any arch CUDA builds for):
//
// - Thread mapping. A group of TPH consecutive lanes (TPH = D / VEC rounded up to a power of two, at most
//   32, so a group never straddles a warp) owns one (batch, query, head). Each lane owns VEC consecutive
//   channels and reads them with one load, so the D channels of a corner are one coalesced segment: in the
//   forward a 16-byte load (VEC = 8 for fp16 / bf16, 4 for fp32, 2 for fp64), in the backward at most 4
//   channels (kBackwardMaxVec). D not divisible by the width falls back to VEC = 4, 2 or 1 (D = 30 works);
//   a head wider than 32 * VEC channels is walked in chunks of 32 * VEC.
// - Geometry once per point: every lane computes the point's corner indices and bilinear weights itself
//   (from a location all lanes of the group read from the same address, a broadcast) and reuses them for
//   its VEC channels; recomputing is cheaper than sharing through shared memory and a barrier.
// - Forward: no atomics; each output element is written by exactly one lane, in the value dtype, from an
//   fp32 (fp64) accumulator.
// - Backward, locations and weights: their gradients are sums over D, reduced with xor-shuffles inside the
//   group (no shared memory, no atomics); lane 0 writes them. Every element is written, so no zero fill.
// - Backward, value: a scatter. Lanes of one warp always hit distinct addresses (distinct channels or
//   heads), so atomics only meet across warps that sample the same pixel, which at these shapes spreads
//   over the L2 slices rather than serialising. sm_90 uses 16-byte vector atomics (one instruction per 4
//   fp32 channels). fp16 / bf16 value gradients accumulate in an fp32 buffer rounded once at the end:
//   packed half2 / bfloat162 atomics would round on every add.
// - Softmax-inside variant (LOGITS): each lane computes the max and the sum of exponentials of its head's
//   L * P logits (16 cached loads) and derives the weights on the fly; the backward applies the softmax
//   Jacobian per head after the point loop, so no weight tensor is ever stored.
// - Indexing: everything derived from the batch or query index is 64-bit; offsets inside one batch element
//   of value are 32-bit (checked on the host: S * M * D < 2^31). Grid-stride loops cover any N * Lq.
// - spatial_shapes / level_start_index stay on the device (no host sync); a level whose shape and start do
//   not fit in S is skipped, so an inconsistent table cannot read out of bounds (the Python entry point
//   checks the table when it lives on the CPU).
// - Determinism: the forward is deterministic. The value-gradient atomics make the backward's summation
//   order vary between runs, so under torch.use_deterministic_algorithms(True) the backward switches to a
//   second algorithm without atomics (sort the points by the pixel they touch, then gather; see
//   point_grad_kernel), which gives the same bits on every run at about 2.3x the time (H100, DINO's
//   encoder: 1.9 ms against 0.8 ms forward + backward).
#include "ms_deform_attn.h"

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <ATen/cuda/Atomic.cuh>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cub/cub.cuh>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <utility>

// 16-byte vector atomicAdd(float4*) / (float2*) exist for sm_90 from CUDA 12.8 on (sm_90_rt.h).
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900 && \
    (__CUDACC_VER_MAJOR__ > 12 || (__CUDACC_VER_MAJOR__ == 12 && __CUDACC_VER_MINOR__ >= 8))
#define MSDA_VECTOR_ATOMICS 1
#else
#define MSDA_VECTOR_ATOMICS 0
#endif

namespace dino_kernels {
namespace {

constexpr int kMaxGroup = 32;  // lanes per (batch, query, head): one warp at most

template <int BYTES>
struct RawType;
template <>
struct RawType<2> {
  using type = unsigned short;
};
template <>
struct RawType<4> {
  using type = unsigned int;
};
template <>
struct RawType<8> {
  using type = uint2;
};
template <>
struct RawType<16> {
  using type = uint4;
};

// 16-bit floats <-> float through their bit patterns in 32-bit words (element 0 in the low half), so
// packed loads and stores stay in registers.
__device__ __forceinline__ float bits_to_float(c10::BFloat16, uint32_t bits16) {
  return __uint_as_float(bits16 << 16);
}
__device__ __forceinline__ float bits_to_float(c10::Half, uint32_t bits16) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits16)));
}

template <typename T>
__device__ __forceinline__ uint32_t float_to_bits(float x) {
  return static_cast<T>(x).x;  // c10's round-to-nearest-even conversion
}

// VEC consecutive elements at p (aligned to their size) through the read-only cache, converted to acc_t.
template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void load_vec(const T* __restrict__ p, acc_t (&out)[VEC]) {
  using Raw = typename RawType<sizeof(T) * VEC>::type;
  const Raw raw = __ldg(reinterpret_cast<const Raw*>(p));
  if constexpr (sizeof(T) == 2 && VEC % 2 == 0) {
    uint32_t words[VEC / 2];
    memcpy(words, &raw, sizeof(Raw));
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      out[2 * i] = bits_to_float(T(), words[i] & 0xffffu);
      out[2 * i + 1] = bits_to_float(T(), words[i] >> 16);
    }
  } else {
    T vals[VEC];
    memcpy(vals, &raw, sizeof(Raw));
#pragma unroll
    for (int i = 0; i < VEC; ++i) out[i] = static_cast<acc_t>(vals[i]);
  }
}

template <int VEC, typename T, typename acc_t>
__device__ __forceinline__ void store_vec(T* __restrict__ p, const acc_t (&in)[VEC]) {
  using Raw = typename RawType<sizeof(T) * VEC>::type;
  Raw raw;
  if constexpr (sizeof(T) == 2 && VEC % 2 == 0) {
    uint32_t words[VEC / 2];
#pragma unroll
    for (int i = 0; i < VEC / 2; ++i) {
      words[i] = float_to_bits<T>(in[2 * i]) | (float_to_bits<T>(in[2 * i + 1]) << 16);
    }
    memcpy(&raw, words, sizeof(Raw));
  } else {
    T vals[VEC];
#pragma unroll
    for (int i = 0; i < VEC; ++i) vals[i] = static_cast<T>(in[i]);
    memcpy(&raw, vals, sizeof(Raw));
  }
  *reinterpret_cast<Raw*>(p) = raw;
}

// p[i] += v[i] for VEC consecutive elements (p aligned to VEC * sizeof(acc_t) when VEC is 2 or a
// multiple of 4).
template <int VEC>
__device__ __forceinline__ void atomic_add_vec(float* p, const float (&v)[VEC]) {
  static_assert(VEC == 1 || VEC == 2 || VEC % 4 == 0, "vector widths are 1, 2, 4 or 8");
#if MSDA_VECTOR_ATOMICS
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int i = 0; i < VEC; i += 4) {
      atomicAdd(reinterpret_cast<float4*>(p + i), make_float4(v[i], v[i + 1], v[i + 2], v[i + 3]));
    }
  } else if constexpr (VEC == 2) {
    atomicAdd(reinterpret_cast<float2*>(p), make_float2(v[0], v[1]));
  } else {
    gpuAtomicAddNoReturn(p, v[0]);
  }
#else
#pragma unroll
  for (int i = 0; i < VEC; ++i) gpuAtomicAddNoReturn(p + i, v[i]);
#endif
}

template <int VEC>
__device__ __forceinline__ void atomic_add_vec(double* p, const double (&v)[VEC]) {
#pragma unroll
  for (int i = 0; i < VEC; ++i) gpuAtomicAddNoReturn(p + i, v[i]);
}

__device__ __forceinline__ float exp_acc(float x) { return expf(x); }
__device__ __forceinline__ double exp_acc(double x) { return exp(x); }

// Max and 1 / sum(exp(x - max)) of one head's L * P logits.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ void softmax_stats(const scalar_t* __restrict__ logits, int LP, acc_t& top,
                                              acc_t& inv_total) {
  top = static_cast<acc_t>(logits[0]);
  for (int i = 1; i < LP; ++i) top = max(top, static_cast<acc_t>(logits[i]));
  acc_t total = 0;
  for (int i = 0; i < LP; ++i) total += exp_acc(static_cast<acc_t>(logits[i]) - top);
  inv_total = acc_t(1) / total;
}

template <bool LOGITS, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t weight_of(const scalar_t* __restrict__ attention, int lp, acc_t top,
                                           acc_t inv_total) {
  const acc_t x = static_cast<acc_t>(attention[lp]);
  return LOGITS ? exp_acc(x - top) * inv_total : x;
}

// Calls f(x, y, w, dw_dx, dw_dy) for each corner of c inside the map: its pixel, its bilinear weight and
// the weight's derivatives with respect to the pixel coordinates x and y.
template <typename acc_t, typename F>
__device__ __forceinline__ void for_each_corner(const Corners<acc_t>& c, const F& f) {
  const acc_t wx0 = 1 - c.fx, wx1 = c.fx, wy0 = 1 - c.fy, wy1 = c.fy;
  if (c.y0_in && c.x0_in) f(c.x0, c.y0, wx0 * wy0, -wy0, -wx0);
  if (c.y0_in && c.x1_in) f(c.x0 + 1, c.y0, wx1 * wy0, wy0, -wx1);
  if (c.y1_in && c.x0_in) f(c.x0, c.y0 + 1, wx0 * wy1, -wy1, wx0);
  if (c.y1_in && c.x1_in) f(c.x0 + 1, c.y0 + 1, wx1 * wy1, wy1, wx1);
}

// The warp lanes of this thread's group of `lanes` lanes (blockDim is a multiple of 32 and groups are
// aligned to their size), for the shuffles of group_sum.
__device__ __forceinline__ unsigned group_lanes_mask(int lanes) {
  return lanes == kMaxGroup ? 0xffffffffu : ((1u << lanes) - 1u) << ((threadIdx.x & 31) & ~(lanes - 1));
}

// Sums a, b and c over the `lanes` lanes of one group with xor-shuffles: every lane of group_mask calls it.
template <typename acc_t>
__device__ __forceinline__ void group_sum(acc_t& a, acc_t& b, acc_t& c, unsigned group_mask, int lanes) {
#pragma unroll
  for (int offset = kMaxGroup / 2; offset > 0; offset >>= 1) {
    if (offset < lanes) {
      a += __shfl_xor_sync(group_mask, a, offset, lanes);
      b += __shfl_xor_sync(group_mask, b, offset, lanes);
      c += __shfl_xor_sync(group_mask, c, offset, lanes);
    }
  }
}

// Sizes the kernels need, by value.
struct Launch {
  int64_t groups;  // N * Lq * M
  int64_t Lq;
  int S, M, D, L, P;
  int group_log2;  // lanes per group = 1 << group_log2
  int chunks;      // passes over D of (lanes * VEC) channels each
};

// Level l's (H, W, start), and whether it fits inside S (see the note at the top).
struct LevelView {
  int H, W, start;
  bool ok;
};

__device__ __forceinline__ LevelView level_view(const int64_t* __restrict__ shapes,
                                                const int64_t* __restrict__ starts, int l, int S) {
  const int64_t H = __ldg(shapes + 2 * l), W = __ldg(shapes + 2 * l + 1), start = __ldg(starts + l);
  const bool ok = H > 0 && W > 0 && start >= 0 && start + H * W <= S;
  return ok ? LevelView{static_cast<int>(H), static_cast<int>(W), static_cast<int>(start), true}
            : LevelView{0, 0, 0, false};
}

template <typename scalar_t, int VEC, bool LOGITS>
__global__ void __launch_bounds__(256)
    forward_kernel(const scalar_t* __restrict__ value, const int64_t* __restrict__ shapes,
                   const int64_t* __restrict__ starts, const at::opmath_type<scalar_t>* __restrict__ loc,
                   const scalar_t* __restrict__ attention, scalar_t* __restrict__ out, const Launch k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lanes = 1 << k.group_log2;
  const int lane = threadIdx.x & (lanes - 1);
  const int LP = k.L * k.P;
  const int row = k.M * k.D;  // elements between neighbouring positions of one head
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t t = first; (t >> k.group_log2) < k.groups; t += stride) {
    const int64_t g = t >> k.group_log2;  // ((n * Lq + q) * M + m)
    const int m = static_cast<int>(g % k.M);
    const int64_t n = g / (k.Lq * k.M);
    const acc_t* loc_g = loc + g * LP * 2;
    const scalar_t* att_g = attention + g * LP;
    acc_t top = 0, inv_total = 1;
    if (LOGITS) softmax_stats(att_g, LP, top, inv_total);
    const scalar_t* value_nm = value + n * k.S * row + m * k.D;
    for (int chunk = 0; chunk < k.chunks; ++chunk) {
      const int c0 = (chunk * lanes + lane) * VEC;
      if (c0 >= k.D) break;  // idle lanes of the last chunk; the forward has no group-wide shuffles
      acc_t acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0;
      for (int l = 0; l < k.L; ++l) {
        const LevelView lv = level_view(shapes, starts, l, k.S);
        if (!lv.ok) continue;
        const scalar_t* value_l = value_nm + lv.start * row + c0;
        for (int p = 0; p < k.P; ++p) {
          const int lp = l * k.P + p;
          Corners<acc_t> c;
          if (!locate(__ldg(loc_g + 2 * lp), __ldg(loc_g + 2 * lp + 1), lv.H, lv.W, c)) continue;
          const acc_t a = weight_of<LOGITS>(att_g, lp, top, inv_total);
          const acc_t wx0 = 1 - c.fx, wx1 = c.fx, wy0 = 1 - c.fy, wy1 = c.fy;
          auto add = [&](int x, int y, acc_t w) {
            acc_t v[VEC];
            load_vec<VEC>(value_l + (y * lv.W + x) * row, v);
            const acc_t aw = a * w;
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[i] += aw * v[i];
          };
          if (c.y0_in && c.x0_in) add(c.x0, c.y0, wx0 * wy0);
          if (c.y0_in && c.x1_in) add(c.x0 + 1, c.y0, wx1 * wy0);
          if (c.y1_in && c.x0_in) add(c.x0, c.y0 + 1, wx0 * wy1);
          if (c.y1_in && c.x1_in) add(c.x0 + 1, c.y0 + 1, wx1 * wy1);
        }
      }
      store_vec<VEC>(out + g * k.D + c0, acc);
    }
  }
}

// grad_value: (N, S, M, D) acc_t, zero-filled. grad_loc: (chunks, N, Lq, M, L, P, 2) acc_t and
// grad_att: (chunks, N, Lq, M, L, P) acc_t, one slice per channel chunk (summed on the host when chunks > 1).
template <typename scalar_t, int VEC, bool LOGITS>
__global__ void __launch_bounds__(256)
    backward_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                    const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                    const at::opmath_type<scalar_t>* __restrict__ loc, const scalar_t* __restrict__ attention,
                    at::opmath_type<scalar_t>* __restrict__ grad_value,
                    at::opmath_type<scalar_t>* __restrict__ grad_loc,
                    at::opmath_type<scalar_t>* __restrict__ grad_att, const Launch k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lanes = 1 << k.group_log2;
  const int lane = threadIdx.x & (lanes - 1);
  const unsigned group_mask = group_lanes_mask(lanes);
  const int LP = k.L * k.P;
  const int row = k.M * k.D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  // Every lane of a group has the same g, so groups enter and leave this loop together and the shuffles
  // below always find all lanes of group_mask.
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t t = first; (t >> k.group_log2) < k.groups; t += stride) {
    const int64_t g = t >> k.group_log2;
    const int m = static_cast<int>(g % k.M);
    const int64_t n = g / (k.Lq * k.M);
    const acc_t* loc_g = loc + g * LP * 2;
    const scalar_t* att_g = attention + g * LP;
    acc_t top = 0, inv_total = 1;
    if (LOGITS) softmax_stats(att_g, LP, top, inv_total);
    const int64_t value_offset = n * k.S * row + m * k.D;
    for (int chunk = 0; chunk < k.chunks; ++chunk) {
      const int c0 = (chunk * lanes + lane) * VEC;
      const bool active = c0 < k.D;  // idle lanes still take part in the shuffles, with zeros
      acc_t gout[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) gout[i] = 0;
      if (active) load_vec<VEC>(grad_output + g * k.D + c0, gout);
      acc_t* grad_loc_g = grad_loc + (chunk * k.groups + g) * LP * 2;
      acc_t* grad_att_g = grad_att + (chunk * k.groups + g) * LP;
      acc_t inner = 0;  // sum over points of weight * d out / d weight (softmax Jacobian)
      for (int l = 0; l < k.L; ++l) {
        const LevelView lv = level_view(shapes, starts, l, k.S);
        const scalar_t* value_l = value + value_offset + lv.start * row + c0;
        acc_t* grad_value_l = grad_value + value_offset + lv.start * row + c0;
        for (int p = 0; p < k.P; ++p) {
          const int lp = l * k.P + p;
          acc_t ga = 0, gx = 0, gy = 0;
          Corners<acc_t> c;
          // Uniform across the group: every lane reads the same location.
          if (lv.ok && locate(__ldg(loc_g + 2 * lp), __ldg(loc_g + 2 * lp + 1), lv.H, lv.W, c)) {
            const acc_t a = weight_of<LOGITS>(att_g, lp, top, inv_total);
            for_each_corner(c, [&](int x, int y, acc_t w, acc_t dw_dx, acc_t dw_dy) {
              if (!active) return;
              const int offset = (y * lv.W + x) * row;
              acc_t v[VEC], scaled[VEC];
              load_vec<VEC>(value_l + offset, v);
              acc_t d = 0;
              const acc_t aw = a * w;
#pragma unroll
              for (int i = 0; i < VEC; ++i) {
                d += gout[i] * v[i];
                scaled[i] = aw * gout[i];
              }
              atomic_add_vec<VEC>(grad_value_l + offset, scaled);
              ga += w * d;
              gx += dw_dx * d;
              gy += dw_dy * d;
            });
            group_sum(ga, gx, gy, group_mask, lanes);
            gx *= a * static_cast<acc_t>(lv.W);
            gy *= a * static_cast<acc_t>(lv.H);
            inner += a * ga;
          }
          if (lane == 0) {
            grad_att_g[lp] = ga;
            grad_loc_g[2 * lp] = gx;
            grad_loc_g[2 * lp + 1] = gy;
          }
        }
      }
      if (LOGITS && k.chunks == 1 && lane == 0) {
        // grad_logit_i = w_i * (grad_w_i - sum_j w_j grad_w_j); lane 0 rereads what it wrote above.
        for (int lp = 0; lp < LP; ++lp) {
          const acc_t w = weight_of<true>(att_g, lp, top, inv_total);
          grad_att_g[lp] = w * (grad_att_g[lp] - inner);
        }
      }
    }
  }
}

// The deterministic backward (under torch.use_deterministic_algorithms(True)), in passes:
// 1. point_grad_kernel gives one group of lanes to each sampling point (n, q, m, l, p): the gradients of its
//    location and weight (dot products of grad_output with the four corners' values, reduced with
//    shuffles), and its bucket: its top-left corner (x0, y0) in [-1, W) x [-1, H) of level l of (batch n,
//    head m).
// 2. The (bucket, point) pairs are radix-sorted (stable: points keep their order inside a bucket) and a
//    binary search finds where each bucket starts.
// 3. value_grad_kernel gives one group to each value element (n, s, m); it sums over the four buckets whose
//    points have this pixel as a corner, in a fixed order, and writes the result once in value's dtype.
// No two threads add into one address, so every run gives the same bits.
// Buckets of one (batch, head) block: level l has (H + 1) x (W + 1) of them, levels one after another.

// (first bucket of level l inside a block, buckets per block)
__device__ __forceinline__ int2 bucket_layout(const int64_t* __restrict__ shapes,
                                              const int64_t* __restrict__ starts, int l, int L, int S) {
  int before = 0, total = 0;
  for (int i = 0; i < L; ++i) {
    const LevelView lv = level_view(shapes, starts, i, S);
    const int size = lv.ok ? (lv.H + 1) * (lv.W + 1) : 0;
    before += i < l ? size : 0;
    total += size;
  }
  return make_int2(before, total);
}

// weights: the attention weights (weight_t = scalar_t), or the softmax of the logits (acc_t).
// grad_loc: (N, Lq, M, L, P, 2) acc_t; grad_weight: (N, Lq, M, L, P) acc_t, d loss / d weight.
// keys / points: the bucket of each point (no_bucket for a point that touches no pixel) and its index.
template <typename scalar_t, int VEC, typename weight_t>
__global__ void __launch_bounds__(256)
    point_grad_kernel(const scalar_t* __restrict__ grad_output, const scalar_t* __restrict__ value,
                      const int64_t* __restrict__ shapes, const int64_t* __restrict__ starts,
                      const at::opmath_type<scalar_t>* __restrict__ loc, const weight_t* __restrict__ weights,
                      at::opmath_type<scalar_t>* __restrict__ grad_loc,
                      at::opmath_type<scalar_t>* __restrict__ grad_weight, uint32_t* __restrict__ keys,
                      int32_t* __restrict__ points, const Launch k, const uint32_t no_bucket) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lanes = 1 << k.group_log2;
  const int lane = threadIdx.x & (lanes - 1);
  const unsigned group_mask = group_lanes_mask(lanes);
  const int LP = k.L * k.P;
  const int row = k.M * k.D;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  // k.groups is the number of points (< 2^31, checked on the host); a group's lanes share pt.
  for (int64_t t = first; (t >> k.group_log2) < k.groups; t += stride) {
    const int pt = static_cast<int>(t >> k.group_log2);
    const int g = pt / LP;  // (n * Lq + q) * M + m
    const int l = (pt - g * LP) / k.P;
    const int m = g % k.M;
    const int n = g / (static_cast<int>(k.Lq) * k.M);
    const LevelView lv = level_view(shapes, starts, l, k.S);
    Corners<acc_t> c;
    const acc_t* loc_p = loc + 2 * static_cast<int64_t>(pt);
    const bool hit = lv.ok && locate(__ldg(loc_p), __ldg(loc_p + 1), lv.H, lv.W, c);
    acc_t ga = 0, gx = 0, gy = 0, a = 0;
    if (hit) {
      a = static_cast<acc_t>(weights[pt]);
      const scalar_t* value_l = value + static_cast<int64_t>(n) * k.S * row + m * k.D + lv.start * row;
      for (int chunk = 0; chunk < k.chunks; ++chunk) {
        const int c0 = (chunk * lanes + lane) * VEC;
        if (c0 >= k.D) break;  // idle lanes add zeros to the shuffles below
        acc_t gout[VEC];
        load_vec<VEC>(grad_output + static_cast<int64_t>(g) * k.D + c0, gout);
        for_each_corner(c, [&](int x, int y, acc_t w, acc_t dw_dx, acc_t dw_dy) {
          acc_t v[VEC];
          load_vec<VEC>(value_l + (y * lv.W + x) * row + c0, v);
          acc_t d = 0;
#pragma unroll
          for (int i = 0; i < VEC; ++i) d += gout[i] * v[i];
          ga += w * d;
          gx += dw_dx * d;
          gy += dw_dy * d;
        });
      }
      // hit is the same for every lane of the group (one location), so the whole group shuffles.
      group_sum(ga, gx, gy, group_mask, lanes);
    }
    if (lane == 0) {
      grad_weight[pt] = ga;
      grad_loc[2 * static_cast<int64_t>(pt)] = gx * a * static_cast<acc_t>(lv.W);
      grad_loc[2 * static_cast<int64_t>(pt) + 1] = gy * a * static_cast<acc_t>(lv.H);
      uint32_t key = no_bucket;
      if (hit) {
        const int2 layout = bucket_layout(shapes, starts, l, k.L, k.S);
        key = static_cast<uint32_t>(static_cast<int64_t>(n * k.M + m) * layout.y + layout.x +
                                    (c.y0 + 1) * (lv.W + 1) + (c.x0 + 1));
      }
      keys[pt] = key;
      points[pt] = pt;
    }
  }
}

// bucket_start[b] = the first index of sorted_keys holding a key >= b, for b in [0, no_bucket].
__global__ void __launch_bounds__(256)
    bucket_start_kernel(const uint32_t* __restrict__ sorted_keys, int count, uint32_t no_bucket,
                        int32_t* __restrict__ bucket_start) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t b = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; b <= no_bucket;
       b += stride) {
    int lo = 0, hi = count;
    while (lo < hi) {
      const int mid = lo + (hi - lo) / 2;
      if (static_cast<int64_t>(__ldg(sorted_keys + mid)) < b) {
        lo = mid + 1;
      } else {
        hi = mid;
      }
    }
    bucket_start[b] = lo;
  }
}

// grad_value: (N, S, M, D) in value's dtype, every element written. k.groups = N * S * M.
template <typename scalar_t, int VEC, typename weight_t>
__global__ void __launch_bounds__(256)
    value_grad_kernel(const scalar_t* __restrict__ grad_output, const int64_t* __restrict__ shapes,
                      const int64_t* __restrict__ starts, const at::opmath_type<scalar_t>* __restrict__ loc,
                      const weight_t* __restrict__ weights, const int32_t* __restrict__ sorted_points,
                      const int32_t* __restrict__ bucket_start, scalar_t* __restrict__ grad_value,
                      const Launch k) {
  using acc_t = at::opmath_type<scalar_t>;
  const int lanes = 1 << k.group_log2;
  const int lane = threadIdx.x & (lanes - 1);
  const int LP = k.L * k.P;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  for (int64_t t = first; (t >> k.group_log2) < k.groups; t += stride) {
    const int64_t g = t >> k.group_log2;  // (n * S + s) * M + m
    const int m = static_cast<int>(g % k.M);
    const int64_t ns = g / k.M;
    const int s = static_cast<int>(ns % k.S);
    const int64_t n = ns / k.S;
    int l = -1;
    LevelView lv{0, 0, 0, false};
    for (int i = 0; i < k.L && l < 0; ++i) {
      const LevelView li = level_view(shapes, starts, i, k.S);
      if (li.ok && s >= li.start && s < li.start + li.H * li.W) {
        l = i;
        lv = li;
      }
    }
    int64_t base = 0;
    int x = 0, y = 0;
    if (l >= 0) {
      const int2 layout = bucket_layout(shapes, starts, l, k.L, k.S);
      base = (n * k.M + m) * layout.y + layout.x;
      y = (s - lv.start) / lv.W;
      x = s - lv.start - y * lv.W;
    }
    for (int chunk = 0; chunk < k.chunks; ++chunk) {
      const int c0 = (chunk * lanes + lane) * VEC;
      if (c0 >= k.D) break;  // no shuffles here
      acc_t acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0;
      // Corner (dx, dy) of the points whose top-left pixel is (x - dx, y - dy).
      for (int corner = 0; l >= 0 && corner < 4; ++corner) {
        const int dx = corner & 1, dy = corner >> 1;
        const int64_t b = base + (y + 1 - dy) * (lv.W + 1) + (x + 1 - dx);
        const int end = __ldg(bucket_start + b + 1);
        for (int i = __ldg(bucket_start + b); i < end; ++i) {
          const int pt = __ldg(sorted_points + i);
          Corners<acc_t> c;
          const acc_t* loc_p = loc + 2 * static_cast<int64_t>(pt);
          locate(__ldg(loc_p), __ldg(loc_p + 1), lv.H, lv.W, c);  // true: it has a bucket
          const acc_t w = static_cast<acc_t>(weights[pt]) * (dx ? c.fx : 1 - c.fx) * (dy ? c.fy : 1 - c.fy);
          acc_t gout[VEC];
          load_vec<VEC>(grad_output + static_cast<int64_t>(pt / LP) * k.D + c0, gout);
#pragma unroll
          for (int j = 0; j < VEC; ++j) acc[j] += w * gout[j];
        }
      }
      store_vec<VEC>(grad_value + g * k.D + c0, acc);
    }
  }
}

// The softmax over each head's LP logits, as acc_t weights (one thread per head).
template <typename scalar_t>
__global__ void __launch_bounds__(256)
    softmax_kernel(const scalar_t* __restrict__ logits, at::opmath_type<scalar_t>* __restrict__ weights,
                   int64_t heads, int LP) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t h = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; h < heads; h += stride) {
    acc_t top, inv_total;
    softmax_stats(logits + h * LP, LP, top, inv_total);
    for (int i = 0; i < LP; ++i) {
      weights[h * LP + i] = exp_acc(static_cast<acc_t>(logits[h * LP + i]) - top) * inv_total;
    }
  }
}

// grad (d loss / d weight on entry, d loss / d logit on return) = w * (grad - sum_j w_j grad_j), per head.
template <typename acc_t>
__global__ void __launch_bounds__(256)
    softmax_backward_kernel(const acc_t* __restrict__ weights, acc_t* __restrict__ grad, int64_t heads,
                            int LP) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t h = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; h < heads; h += stride) {
    acc_t inner = 0;
    for (int i = 0; i < LP; ++i) inner += weights[h * LP + i] * grad[h * LP + i];
    for (int i = 0; i < LP; ++i) grad[h * LP + i] = weights[h * LP + i] * (grad[h * LP + i] - inner);
  }
}

// Largest of {widest (16 bytes), 4, 2, 1} elements per lane, at most cap, that divides D and keeps every
// pointer aligned.
template <typename scalar_t>
int vector_width(int64_t D, std::initializer_list<const void*> pointers, int cap = 16) {
  constexpr int widest = 16 / sizeof(scalar_t);
  for (const int vec : {widest, 4, 2, 1}) {
    if (vec > widest || vec > cap || D % vec != 0) continue;
    bool aligned = true;
    for (const void* p : pointers) {
      aligned = aligned && reinterpret_cast<uintptr_t>(p) % (vec * sizeof(scalar_t)) == 0;
    }
    if (aligned) return vec;
  }
  return 1;
}

template <typename scalar_t, typename F>
void with_vector_width(int vec, const F& f) {
  constexpr int widest = 16 / sizeof(scalar_t);
  if (vec == widest) {
    f(std::integral_constant<int, widest>{});
  } else if constexpr (widest > 4) {
    if (vec == 4) {
      f(std::integral_constant<int, 4>{});
    } else if (vec == 2) {
      f(std::integral_constant<int, 2>{});
    } else {
      f(std::integral_constant<int, 1>{});
    }
  } else if (vec == 2) {
    f(std::integral_constant<int, 2>{});
  } else {
    f(std::integral_constant<int, 1>{});
  }
}

// The backward's widest vector: 4 channels per lane (8-byte loads for fp16 / bf16), so a head of 32
// channels has 8 lanes, as in fp32. With 16-byte loads a 16-bit head had 4 lanes, each issuing twice the
// value-gradient atomics with half the threads to hide their latency: encoder 4-scale bf16 forward +
// backward took 1.20 ms on an H100 against 0.73 ms with 4 channels per lane (2 per lane: 0.79 ms).
constexpr int kBackwardMaxVec = 4;

Launch make_launch(const Sizes& s, int vec) {
  const int64_t vectors = s.D / vec;
  int group_log2 = 0;
  while ((1 << group_log2) < vectors && (1 << group_log2) < kMaxGroup) ++group_log2;
  const int64_t per_chunk = (int64_t{1} << group_log2) * vec;
  return Launch{s.N * s.Lq * s.M,
                s.Lq,
                static_cast<int>(s.S),
                static_cast<int>(s.M),
                static_cast<int>(s.D),
                static_cast<int>(s.L),
                static_cast<int>(s.P),
                group_log2,
                static_cast<int>((s.D + per_chunk - 1) / per_chunk)};
}

// Blocks of 256 threads (128 when that leaves fewer than two blocks per SM, e.g. the decoder's ~1k queries),
// at most 32 blocks per SM; the grid-stride loops cover the rest. (c10's stream and the runtime's attribute
// query rather than ATen/cuda/CUDAContext.h, whose cuBLAS / cuSPARSE includes a bare nvcc install lacks.)
std::pair<dim3, dim3> grid_for(const Launch& k, c10::DeviceIndex device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t total = k.groups << k.group_log2;
  int threads = 256;
  if ((total + threads - 1) / threads < 2 * sms) threads = 128;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t{32} * sms);
  return {dim3(static_cast<unsigned>(blocks)), dim3(threads)};
}

at::Tensor forward_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                        const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                        const at::Tensor& attention, bool logits) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention,
                               logits ? "attention_logits" : "attention_weights");
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_forward_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor v = value.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor att = attention.contiguous();
  at::Tensor out = at::empty({s.N, s.Lq, s.M * s.D}, value.options());
  if (out.numel() == 0) return out;
  const auto dtype = v.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ms_deform_attn_forward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    const int vec = vector_width<scalar_t>(s.D, {v.data_ptr(), out.data_ptr()});
    with_vector_width<scalar_t>(vec, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      const Launch k = make_launch(s, VEC);
      const auto [blocks, threads] = grid_for(k, value.device().index());
      auto kernel = logits ? forward_kernel<scalar_t, VEC, true> : forward_kernel<scalar_t, VEC, false>;
      kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
          v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
          loc.data_ptr<acc_t>(), att.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), k);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  });
  return out;
}

// The default backward: one group of lanes per (batch, query, head); the value gradient is scattered with
// atomics (backward_kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor> scatter_backward(const Sizes& s, const at::Tensor& gout,
                                                                const at::Tensor& v, const at::Tensor& shapes,
                                                                const at::Tensor& starts,
                                                                const at::Tensor& loc, const at::Tensor& att,
                                                                bool logits) {
  const auto acc_type = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = v.options().dtype(acc_type);
  at::Tensor grad_value = at::zeros(v.sizes(), acc_options);
  at::Tensor grad_loc, grad_att;
  int chunks = 1;
  if (s.N * s.Lq > 0) {
    const auto dtype = v.scalar_type();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ms_deform_attn_backward_cuda", [&] {
      using acc_t = at::opmath_type<scalar_t>;
      const int vec = vector_width<scalar_t>(s.D, {v.data_ptr(), gout.data_ptr()}, kBackwardMaxVec);
      with_vector_width<scalar_t>(vec, [&](auto width) {
        constexpr int VEC = decltype(width)::value;
        const Launch k = make_launch(s, VEC);
        chunks = k.chunks;
        grad_loc = at::empty({k.chunks, s.N, s.Lq, s.M, s.L, s.P, 2}, acc_options);
        grad_att = at::empty({k.chunks, s.N, s.Lq, s.M, s.L, s.P}, acc_options);
        const auto [blocks, threads] = grid_for(k, v.device().index());
        auto kernel = logits ? backward_kernel<scalar_t, VEC, true> : backward_kernel<scalar_t, VEC, false>;
        kernel<<<blocks, threads, 0, c10::cuda::getCurrentCUDAStream()>>>(
            gout.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
            starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(), att.data_ptr<scalar_t>(),
            grad_value.data_ptr<acc_t>(), grad_loc.data_ptr<acc_t>(), grad_att.data_ptr<acc_t>(), k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    });
  } else {
    grad_loc = at::zeros({1, s.N, s.Lq, s.M, s.L, s.P, 2}, acc_options);
    grad_att = at::zeros({1, s.N, s.Lq, s.M, s.L, s.P}, acc_options);
  }
  at::Tensor grad_loc_total = chunks == 1 ? grad_loc.select(0, 0) : grad_loc.sum(0);
  at::Tensor grad_att_total = chunks == 1 ? grad_att.select(0, 0) : grad_att.sum(0);
  if (logits && chunks > 1) {
    // The kernel applies the softmax Jacobian itself only when one chunk saw the whole head.
    const at::Tensor w = att.to(acc_type).flatten(3).softmax(-1).view_as(grad_att_total);
    const at::Tensor gw = grad_att_total;
    grad_att_total = w * (gw - (w * gw).flatten(3).sum(-1).view({s.N, s.Lq, s.M, 1, 1}));
  }
  return {grad_value.to(v.scalar_type()), grad_loc_total, grad_att_total.to(att.scalar_type())};
}

// A grid of at most 32 blocks of 256 threads per SM for `items` independent one-thread items.
std::pair<dim3, dim3> flat_grid(int64_t items, c10::DeviceIndex device) {
  int sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int64_t blocks = std::min<int64_t>(std::max<int64_t>((items + 255) / 256, 1), int64_t{32} * sms);
  return {dim3(static_cast<unsigned>(blocks)), dim3(256)};
}

// The deterministic backward: sort the points by bucket and gather (point_grad_kernel, value_grad_kernel).
std::tuple<at::Tensor, at::Tensor, at::Tensor> gather_backward(const Sizes& s, const at::Tensor& gout,
                                                               const at::Tensor& v, const at::Tensor& shapes,
                                                               const at::Tensor& starts,
                                                               const at::Tensor& loc, const at::Tensor& att,
                                                               bool logits) {
  const int64_t n_points = s.N * s.Lq * s.M * s.L * s.P;
  // Bucket keys are 32-bit: a (batch, head) block has at most sum (H + 1)(W + 1) <= 2 S + 2 L buckets.
  const int64_t no_bucket = s.N * s.M * (2 * s.S + 2 * s.L);
  TORCH_CHECK(n_points < (int64_t{1} << 31) && no_bucket < (int64_t{1} << 32) - 1,
              "ms_deform_attn_backward_cuda (deterministic): ", n_points, " sampling points over ", s.N * s.M,
              " (batch, head) maps of ", s.S, " pixels is beyond its 32-bit indices; split the batch");
  const auto acc_type = v.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const auto acc_options = v.options().dtype(acc_type);
  if (n_points == 0) {
    return {at::zeros(v.sizes(), v.options()), at::zeros(loc.sizes(), acc_options),
            at::zeros(att.sizes(), att.options())};
  }
  at::Tensor grad_value = at::empty(v.sizes(), v.options());
  at::Tensor grad_loc = at::empty(loc.sizes(), acc_options);
  at::Tensor grad_weight = at::empty(att.sizes(), acc_options);
  // Bucket keys (uint32 bits) and point indices, unsorted then sorted.
  const auto index_options = v.options().dtype(at::kInt);
  at::Tensor keys = at::empty({2 * n_points}, index_options);
  at::Tensor points = at::empty({2 * n_points}, index_options);
  auto* keys_in = reinterpret_cast<uint32_t*>(keys.data_ptr<int32_t>());
  uint32_t* keys_sorted = keys_in + n_points;
  int32_t* points_in = points.data_ptr<int32_t>();
  int32_t* points_sorted = points_in + n_points;
  int end_bit = 1;
  while ((int64_t{1} << end_bit) <= no_bucket) ++end_bit;
  const auto device = v.device().index();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const int64_t heads = s.N * s.Lq * s.M;
  const int LP = static_cast<int>(s.L * s.P);
  const auto dtype = v.scalar_type();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "ms_deform_attn_backward_cuda", [&] {
    using acc_t = at::opmath_type<scalar_t>;
    at::Tensor softmax;
    if (logits) {
      softmax = at::empty(att.sizes(), acc_options);
      const auto [blocks, threads] = flat_grid(heads, device);
      softmax_kernel<scalar_t><<<blocks, threads, 0, stream>>>(att.data_ptr<scalar_t>(),
                                                               softmax.data_ptr<acc_t>(), heads, LP);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int vec = vector_width<scalar_t>(s.D, {v.data_ptr(), gout.data_ptr()}, kBackwardMaxVec);
    with_vector_width<scalar_t>(vec, [&](auto width) {
      constexpr int VEC = decltype(width)::value;
      auto passes = [&](const auto* weights) {
        using weight_t = std::remove_cv_t<std::remove_pointer_t<decltype(weights)>>;
        Launch k = make_launch(s, VEC);
        k.groups = n_points;
        {
          const auto [blocks, threads] = grid_for(k, device);
          point_grad_kernel<scalar_t, VEC, weight_t><<<blocks, threads, 0, stream>>>(
              gout.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(),
              starts.data_ptr<int64_t>(), loc.data_ptr<acc_t>(), weights, grad_loc.data_ptr<acc_t>(),
              grad_weight.data_ptr<acc_t>(), keys_in, points_in, k, static_cast<uint32_t>(no_bucket));
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        size_t temp_bytes = 0;
        C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(nullptr, temp_bytes, keys_in, keys_sorted, points_in,
                                                       points_sorted, static_cast<int>(n_points), 0, end_bit,
                                                       stream));
        at::Tensor temp = at::empty({static_cast<int64_t>(temp_bytes)}, v.options().dtype(at::kByte));
        C10_CUDA_CHECK(cub::DeviceRadixSort::SortPairs(temp.data_ptr(), temp_bytes, keys_in, keys_sorted,
                                                       points_in, points_sorted, static_cast<int>(n_points),
                                                       0, end_bit, stream));
        at::Tensor bucket_start = at::empty({no_bucket + 1}, index_options);
        {
          const auto [blocks, threads] = flat_grid(no_bucket + 1, device);
          bucket_start_kernel<<<blocks, threads, 0, stream>>>(keys_sorted, static_cast<int>(n_points),
                                                              static_cast<uint32_t>(no_bucket),
                                                              bucket_start.data_ptr<int32_t>());
          C10_CUDA_KERNEL_LAUNCH_CHECK();
        }
        k.groups = s.N * s.S * s.M;
        const auto [blocks, threads] = grid_for(k, device);
        value_grad_kernel<scalar_t, VEC, weight_t><<<blocks, threads, 0, stream>>>(
            gout.data_ptr<scalar_t>(), shapes.data_ptr<int64_t>(), starts.data_ptr<int64_t>(),
            loc.data_ptr<acc_t>(), weights, points_sorted, bucket_start.data_ptr<int32_t>(),
            grad_value.data_ptr<scalar_t>(), k);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      };
      if (logits) {
        passes(static_cast<const acc_t*>(softmax.data_ptr<acc_t>()));
      } else {
        passes(static_cast<const scalar_t*>(att.data_ptr<scalar_t>()));
      }
    });
    if (logits) {
      const auto [blocks, threads] = flat_grid(heads, device);
      softmax_backward_kernel<acc_t><<<blocks, threads, 0, stream>>>(
          softmax.data_ptr<acc_t>(), grad_weight.data_ptr<acc_t>(), heads, LP);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return {grad_value, grad_loc, grad_weight.to(att.scalar_type())};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cuda(
    const at::Tensor& grad_output, const at::Tensor& value, const at::Tensor& spatial_shapes,
    const at::Tensor& level_start_index, const at::Tensor& sampling_locations, const at::Tensor& attention,
    bool logits) {
  const Sizes s = check_inputs(value, spatial_shapes, level_start_index, sampling_locations, attention,
                               logits ? "attention_logits" : "attention_weights");
  check_grad_output(grad_output, value, s);
  TORCH_CHECK(value.is_cuda(), "ms_deform_attn_backward_cuda: tensors must be on a CUDA device");
  const c10::cuda::CUDAGuard guard(value.device());
  const at::Tensor gout = grad_output.contiguous();
  const at::Tensor v = value.contiguous();
  const at::Tensor shapes = spatial_shapes.contiguous();
  const at::Tensor starts = level_start_index.contiguous();
  const at::Tensor loc = sampling_locations.contiguous();
  const at::Tensor att = attention.contiguous();
  const auto backward = at::globalContext().deterministicAlgorithms() ? gather_backward : scatter_backward;
  return backward(s, gout, v, shapes, starts, loc, att, logits);
}

at::Tensor forward_weights_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                                const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                                const at::Tensor& attention_weights) {
  return forward_cuda(value, spatial_shapes, level_start_index, sampling_locations, attention_weights, false);
}

at::Tensor forward_logits_cuda(const at::Tensor& value, const at::Tensor& spatial_shapes,
                               const at::Tensor& level_start_index, const at::Tensor& sampling_locations,
                               const at::Tensor& attention_logits) {
  return forward_cuda(value, spatial_shapes, level_start_index, sampling_locations, attention_logits, true);
}

}  // namespace

TORCH_LIBRARY_IMPL(dino_kernels, CUDA, m) {
  m.impl("ms_deform_attn", &forward_weights_cuda);
  m.impl("ms_deform_attn_from_logits", &forward_logits_cuda);
  m.impl("ms_deform_attn_backward", &backward_cuda);
}

}  // namespace dino_kernels
