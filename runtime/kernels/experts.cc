// This device's share of a MoE layer's routed (token, expert) pairs, for CPU steps, through XLA's FFI.
//
// XLA:CPU's loop over experts copies each expert's weights out of the layer stack before its dots
// (a dynamic slice feeding a dot is materialised), gathers the pairs' token rows into a copy, and
// runs every dot on one core. Here each pair's token row and each expert's weights are read where
// they lie, rows of pairs are multiplied a register tile at a time, and chunks of pairs are shared
// by the pool's threads. Each pair's output row is summed into its token's in pair order, on one
// thread, after the chunks: the result is the same bits however the chunks were shared out.
// Semantics are dp_attention.model.experts_by_expert's:
//   y[token[p]] += weight[p] * down_e(silu(x[token[p]] gate_e) * (x[token[p]] up_e))
// over the pairs p of each local expert e, which come sorted by expert from row 0, counts[e] each.
//
// Shapes: x [N, H] float32; gate, up [Lm, E, H, I], down [Lm, E, I, H] float32 (this device's
// experts and columns); layer [1]; token [M] int32; weight [M] float32; counts [E] int32
// -> y [N, H] float32 (partial sums: the other devices' columns are theirs).

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

typedef float Vec __attribute__((vector_size(64)));  // 16 floats: one AVX-512 register
constexpr int64_t kLanes = 16;
constexpr int64_t kChunkRows = 32;  // pairs per work item: an expert's rows are cut into these

inline Vec Load(const float* p) {
  Vec v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

inline void Store(float* p, Vec v) { std::memcpy(p, &v, sizeof v); }

// out[r][c0 : c0 + 16 * NV] = sum_k a[r][k] * b[k][c0 : ...] for RM rows: RM x NV accumulators held
// in registers across the whole contraction, each b row loaded once for all RM rows.
template <int RM, int NV>
inline void Tile(const float* const* a, int64_t K, const float* b, int64_t ldb, int64_t c0, float* const* out) {
  Vec acc[RM][NV] = {};
  for (int64_t k = 0; k < K; ++k) {
    Vec bk[NV];
    for (int v = 0; v < NV; ++v) bk[v] = Load(b + k * ldb + c0 + v * kLanes);
    for (int r = 0; r < RM; ++r) {
      const float ar = a[r][k];
      for (int v = 0; v < NV; ++v) acc[r][v] += bk[v] * ar;
    }
  }
  for (int r = 0; r < RM; ++r)
    for (int v = 0; v < NV; ++v) Store(out[r] + c0 + v * kLanes, acc[r][v]);
}

template <int RM>
void Rows(const float* const* a, int64_t K, const float* b, int64_t ldb, int64_t n, float* const* out) {
  int64_t c = 0;
  for (; c + 4 * kLanes <= n; c += 4 * kLanes) Tile<RM, 4>(a, K, b, ldb, c, out);
  for (; c + kLanes <= n; c += kLanes) Tile<RM, 1>(a, K, b, ldb, c, out);
  for (; c < n; ++c) {  // columns past the last whole vector
    for (int r = 0; r < RM; ++r) {
      float s = 0.f;
      for (int64_t k = 0; k < K; ++k) s += a[r][k] * b[k * ldb + c];
      out[r][c] = s;
    }
  }
}

// out[r] = a[r] . b ([K, n], row stride ldb) for `rows` rows given by pointers.
void MatMul(const float* const* a, int64_t rows, int64_t K, const float* b, int64_t ldb, int64_t n,
            float* const* out) {
  int64_t r = 0;
  for (; r + 4 <= rows; r += 4) Rows<4>(a + r, K, b, ldb, n, out + r);
  switch (rows - r) {
    case 3: Rows<3>(a + r, K, b, ldb, n, out + r); break;
    case 2: Rows<2>(a + r, K, b, ldb, n, out + r); break;
    case 1: Rows<1>(a + r, K, b, ldb, n, out + r); break;
    default: break;
  }
}

struct Scratch {
  std::vector<float> gate, up;
  std::vector<const float*> rows_in, h_rows;
  std::vector<float*> gate_out, up_out, down_out;
};

ffi::Error Experts(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> gate,
                   ffi::Buffer<ffi::F32> up, ffi::Buffer<ffi::F32> down, ffi::Buffer<ffi::S32> layer,
                   ffi::Buffer<ffi::S32> token, ffi::Buffer<ffi::F32> weight, ffi::Buffer<ffi::S32> counts,
                   ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions(), gd = gate.dimensions(), dd = down.dimensions();
  if (xd.size() != 2 || gd.size() != 4 || dd.size() != 4 || gd[2] != xd[1] || dd[3] != xd[1] ||
      dd[2] != gd[3] || dd[1] != gd[1] || counts.element_count() != static_cast<size_t>(gd[1]) ||
      token.element_count() != weight.element_count()) {
    return ffi::Error::InvalidArgument("dp_experts: x [N, H], gate/up [L, E, H, I], down [L, E, I, H], "
                                       "counts [E], token and weight [M] expected");
  }
  const int64_t N = xd[0], H = xd[1], L = gd[0], E = gd[1], I = gd[3];
  const int64_t M = token.element_count();
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);
  const float* X = x.typed_data();
  const float* G = gate.typed_data() + l * E * H * I;
  const float* U = up.typed_data() + l * E * H * I;
  const float* D = down.typed_data() + l * E * I * H;
  const int32_t* tok = token.typed_data();
  const float* wt = weight.typed_data();
  float* Y = y->typed_data();
  std::fill(Y, Y + N * H, 0.f);

  std::vector<std::array<int64_t, 3>> chunks;  // expert, first pair, pairs
  for (int64_t e = 0, start = 0; e < E; ++e) {
    const int64_t count = std::clamp<int64_t>(counts.typed_data()[e], 0, M - start);
    for (int64_t r = 0; r < count; r += kChunkRows) chunks.push_back({e, start + r, std::min(kChunkRows, count - r)});
    start += count;
  }
  const int64_t workers = dp_kernels::Workers(pool, chunks.size()), pairs = chunks.empty() ? 0 : [&] {
    auto [e, first, rows] = chunks.back();
    return first + rows;
  }();
  std::vector<float> out(pairs * H);  // each pair's weighted output row
  std::vector<Scratch> scratch(workers);
  dp_kernels::ParallelFor(pool, chunks.size(), [&](int64_t w, int64_t i) {
    Scratch& s = scratch[w];
    if (s.gate.empty()) {
      s.gate.resize(kChunkRows * I), s.up.resize(kChunkRows * I);
      s.rows_in.resize(kChunkRows), s.h_rows.resize(kChunkRows);
      s.gate_out.resize(kChunkRows), s.up_out.resize(kChunkRows), s.down_out.resize(kChunkRows);
      for (int64_t r = 0; r < kChunkRows; ++r) {
        s.gate_out[r] = s.gate.data() + r * I, s.up_out[r] = s.up.data() + r * I;
        s.h_rows[r] = s.gate_out[r];
      }
    }
    auto [e, first, rows] = chunks[i];
    for (int64_t r = 0; r < rows; ++r) {
      s.rows_in[r] = X + std::clamp<int64_t>(tok[first + r], 0, N - 1) * H;
      s.down_out[r] = out.data() + (first + r) * H;
    }
    MatMul(s.rows_in.data(), rows, H, G + e * H * I, I, I, s.gate_out.data());
    MatMul(s.rows_in.data(), rows, H, U + e * H * I, I, I, s.up_out.data());
    float* h = s.gate.data();  // silu(gate) * up, in place of gate
    const float* u = s.up.data();
#pragma omp simd
    for (int64_t j = 0; j < rows * I; ++j) h[j] = h[j] / (1.f + dp_kernels::Exp(-h[j])) * u[j];
    MatMul(s.h_rows.data(), rows, I, D + e * I * H, H, H, s.down_out.data());
    for (int64_t r = 0; r < rows; ++r) {
      float* row = s.down_out[r];
      const float c = wt[first + r];
#pragma omp simd
      for (int64_t j = 0; j < H; ++j) row[j] *= c;
    }
  });
  for (int64_t p = 0; p < pairs; ++p) {
    float* dst = Y + std::clamp<int64_t>(tok[p], 0, N - 1) * H;
    const float* src = out.data() + p * H;
#pragma omp simd
    for (int64_t j = 0; j < H; ++j) dst[j] += src[j];
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpExperts, Experts,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // x
                                  .Arg<ffi::Buffer<ffi::F32>>()   // gate
                                  .Arg<ffi::Buffer<ffi::F32>>()   // up
                                  .Arg<ffi::Buffer<ffi::F32>>()   // down
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // token
                                  .Arg<ffi::Buffer<ffi::F32>>()   // weight
                                  .Arg<ffi::Buffer<ffi::S32>>()   // counts
                                  .Ret<ffi::Buffer<ffi::F32>>());  // y
