// mone's CUDA kernels for the inference forward, compiled to PTX by build.rs with the `cuda`
// feature and loaded through candle's device (the driver JIT-compiles the PTX for the GPU).
//
// - attention_*: softmax(q k^T / sqrt(hd)) v for every (sequence, head), reading Q, K and V
//   where the QKV projection wrote them (rows of [q | k | v], heads side by side) and writing
//   the merged heads, so no head split/merge copies and no materialised scores. One thread per
//   query row with an online softmax over key tiles in shared memory (the FlashAttention
//   recurrence, Dao et al. 2022), f32 accumulation.
// - bias_act_*: y = s_r * act(y + b) after a GEMM that wrote y (the in-projections' epilogue).
// - add_bias_rows_*: x[r, :width] += s_r * b[:width] before a GEMM accumulates into x (the
//   out-projections' epilogue, done first because cuBLAS then adds onto it).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) {
  return __float2bfloat16(x);
}

// Keys per shared-memory tile.
#define KT 32

// qkv: (rows, 3 * heads * HD) with row stride ld_in; out: (rows, heads * HD), row stride
// ld_out. Token p of sequence q sits in row p * s + q (token_major) or q * n + p.
// Grid: (ceil(n / blockDim.x), heads, s).
template <typename T, int HD>
__device__ void attention(const T *__restrict__ qkv, T *__restrict__ out, int n, int s,
                          int heads, int token_major, long ld_in, long ld_out, float scale) {
  __shared__ float4 ks[KT][HD / 4];
  __shared__ float4 vs[KT][HD / 4];
  const int d_model = heads * HD;
  const int seq = blockIdx.z;
  const int h = blockIdx.y;
  const int p = blockIdx.x * blockDim.x + threadIdx.x;
  const bool active = p < n;
  const long tok_stride = token_major ? (long)s : 1;
  const long seq_base = token_major ? (long)seq : (long)seq * n;

  float q[HD];
  float acc[HD];
  float m = -INFINITY;
  float l = 0.f;
  if (active) {
    const T *qr = qkv + (seq_base + p * tok_stride) * ld_in + h * HD;
#pragma unroll
    for (int d = 0; d < HD; d++) {
      q[d] = to_f(qr[d]) * scale;
      acc[d] = 0.f;
    }
  }
  for (int k0 = 0; k0 < n; k0 += KT) {
    const int kn = min(KT, n - k0);
    for (int i = threadIdx.x; i < kn * (HD / 4); i += blockDim.x) {
      const int j = i / (HD / 4);
      const int d = (i % (HD / 4)) * 4;
      const T *r = qkv + (seq_base + (long)(k0 + j) * tok_stride) * ld_in + h * HD + d;
      ks[j][d / 4] = make_float4(to_f(r[d_model]), to_f(r[d_model + 1]), to_f(r[d_model + 2]),
                                 to_f(r[d_model + 3]));
      vs[j][d / 4] = make_float4(to_f(r[2 * d_model]), to_f(r[2 * d_model + 1]),
                                 to_f(r[2 * d_model + 2]), to_f(r[2 * d_model + 3]));
    }
    __syncthreads();
    if (active) {
      float sc[KT];
      float tile_max = -INFINITY;
#pragma unroll
      for (int j = 0; j < KT; j++) {
        float a = 0.f;
        if (j < kn) {
#pragma unroll
          for (int d4 = 0; d4 < HD / 4; d4++) {
            const float4 k = ks[j][d4];
            a += q[4 * d4] * k.x + q[4 * d4 + 1] * k.y + q[4 * d4 + 2] * k.z + q[4 * d4 + 3] * k.w;
          }
          tile_max = fmaxf(tile_max, a);
        }
        sc[j] = a;
      }
      const float m_new = fmaxf(m, tile_max);
      const float corr = __expf(m - m_new);  // 0 on the first tile (m = -inf)
      l *= corr;
#pragma unroll
      for (int d = 0; d < HD; d++) acc[d] *= corr;
#pragma unroll
      for (int j = 0; j < KT; j++) {
        if (j < kn) {
          const float e = __expf(sc[j] - m_new);
          l += e;
#pragma unroll
          for (int d4 = 0; d4 < HD / 4; d4++) {
            const float4 v = vs[j][d4];
            acc[4 * d4] += e * v.x;
            acc[4 * d4 + 1] += e * v.y;
            acc[4 * d4 + 2] += e * v.z;
            acc[4 * d4 + 3] += e * v.w;
          }
        }
      }
      m = m_new;
    }
    __syncthreads();
  }
  if (active) {
    const float inv = 1.f / l;
    T *o = out + (seq_base + p * tok_stride) * ld_out + h * HD;
#pragma unroll
    for (int d = 0; d < HD; d++) o[d] = from_f<T>(acc[d] * inv);
  }
}

#define ATTN(TY, NAME, HD)                                                                     \
  extern "C" __global__ void attention_##NAME##_##HD(const TY *qkv, TY *out, int n, int s,      \
                                                     int heads, int token_major, long ld_in,   \
                                                     long ld_out, float scale) {               \
    attention<TY, HD>(qkv, out, n, s, heads, token_major, ld_in, ld_out, scale);              \
  }
#define ATTN_ALL(TY, NAME)                                                                     \
  ATTN(TY, NAME, 16)                                                                           \
  ATTN(TY, NAME, 24)                                                                           \
  ATTN(TY, NAME, 32)                                                                           \
  ATTN(TY, NAME, 48)                                                                           \
  ATTN(TY, NAME, 64)                                                                           \
  ATTN(TY, NAME, 96)                                                                           \
  ATTN(TY, NAME, 128)

ATTN_ALL(float, f32)
ATTN_ALL(__nv_bfloat16, bf16)
ATTN_ALL(__half, f16)

// act: 0 none, 1 GELU (tanh approximation), 2 GELU (erf).
__device__ __forceinline__ float activate(float x, int act) {
  if (act == 1) {
    const float c = 0.7978845608028654f;  // sqrt(2 / pi)
    return 0.5f * x * (1.f + tanhf(c * (x + 0.044715f * x * x * x)));
  }
  if (act == 2) return 0.5f * x * (1.f + erff(x * 0.7071067811865476f));
  return x;
}

// y (rows, cols), row stride ld: y = s_r * act(y + b). scale may be null (s_r = 1).
template <typename T>
__device__ void bias_act(T *y, const T *b, const T *scale, long rows, int cols, long ld,
                         int act) {
  const long total = rows * cols;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
       i += (long)gridDim.x * blockDim.x) {
    const long r = i / cols;
    const int c = (int)(i % cols);
    T *p = y + r * ld + c;
    float v = activate(to_f(*p) + to_f(b[c]), act);
    if (scale) v *= to_f(scale[r]);
    *p = from_f<T>(v);
  }
}

// x (rows, width) of a row stride ld: x += s_r * b. scale, if not null, is indexed by row.
template <typename T>
__device__ void add_bias_rows(T *x, const T *b, const T *scale, long rows, int width, long ld) {
  const long total = rows * width;
  for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < total;
       i += (long)gridDim.x * blockDim.x) {
    const long r = i / width;
    const int c = (int)(i % width);
    T *p = x + r * ld + c;
    float bv = to_f(b[c]);
    if (scale) bv *= to_f(scale[r]);
    *p = from_f<T>(to_f(*p) + bv);
  }
}

#define EPILOGUES(TY, NAME)                                                                    \
  extern "C" __global__ void bias_act_##NAME(TY *y, const TY *b, const TY *scale, long rows,    \
                                             int cols, long ld, int act) {                     \
    bias_act<TY>(y, b, scale, rows, cols, ld, act);                                            \
  }                                                                                            \
  extern "C" __global__ void add_bias_rows_##NAME(TY *x, const TY *b, const TY *scale,          \
                                                  long rows, int width, long ld) {             \
    add_bias_rows<TY>(x, b, scale, rows, width, ld);                                           \
  }

EPILOGUES(float, f32)
EPILOGUES(__nv_bfloat16, bf16)
EPILOGUES(__half, f16)
