// Paged attention over the native KV cache, for CPU steps, called through XLA's FFI.
//
// XLA:CPU reads a page table only by gathering: every block of K/V a query needs is copied into a
// dense buffer, then read again by the dot products, and the copies are most of a decode step's
// attention. This kernel reads each key and value where it lies in the cache, once per tile of
// query rows, and does the softmax in one pass over a row of scores. Semantics are those of
// dp_attention.attention.NativeAttentionBackend: row t attends positions 0..positions[t] of
// sequence seq_index[t], through page_table[seq_index[t]]; rows with run[t] false are left zero.
//
// Shapes (one device's shard): q [T, nq, hd] float32, scaled; kv [L, P, page_size, 2*nkv, hdc]
// float32 (K of head j at 2j, V at 2j+1; hdc >= hd); layer [1]; positions, seq_index [T] int32;
// run [T] bool; page_table [S, pages_per_seq] int32 -> out [T, nq, hd] float32.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#include "common.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxTileRows = 16;  // consecutive rows of one sequence that share one read of K/V
constexpr int64_t kKeyBlock = 16;     // keys transposed at a time for a tile's scores (one AVX-512 vector)
constexpr int64_t kRowsAtOnce = 4;    // query vectors scored together against a transposed block

inline float Dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void Axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

struct Shapes {
  int64_t T, nq, hd, P, ps, nkv, hdc, g, S, pps;
};

constexpr int64_t kPrefetchKeys = 8;  // how far ahead a decode row asks for its slots (a page of 8)

// A slot's bytes (every head's K and V) on their way to the cache while earlier keys are scored: a
// decode row's slots lie a page at a time wherever its pages are, so the hardware's prefetchers lose
// the stream at every page, and one core waiting on memory read ~12 GB/s where it can read ~20.
inline void Prefetch(const float* p, int64_t floats) {
  const char* b = reinterpret_cast<const char*>(p);
  for (int64_t i = 0; i < floats * static_cast<int64_t>(sizeof(float)); i += 64) __builtin_prefetch(b + i);
}

// One query row, every head: a dot per key, all heads of a slot read together.
void DecodeScores(const Shapes& d, const float* q, int64_t n, const std::vector<const float*>& slot, float* scores) {
  const int64_t max_ctx = d.pps * d.ps, slot_floats = 2 * d.nkv * d.hdc;
  for (int64_t j = 0; j < std::min(n, kPrefetchKeys); ++j) Prefetch(slot[j], slot_floats);
  for (int64_t j = 0; j < n; ++j) {
    if (j + kPrefetchKeys < n) Prefetch(slot[j + kPrefetchKeys], slot_floats);
    for (int64_t head = 0; head < d.nq; ++head)
      scores[head * max_ctx + j] = Dot(q + head * d.hd, slot[j] + 2 * (head / d.g) * d.hdc, d.hd);
  }
}

// Rows [t, t + R) against kv head h's keys, kKeyBlock keys at a time: the block is transposed once
// ([hd][kKeyBlock], `kt`) so each query row's scores for it are kKeyBlock lanes of one vector
// (broadcast-multiply-add over hd) instead of kKeyBlock dot products that each end in a reduction.
void TileScores(const Shapes& d, const float* Q, const int32_t* pos, int64_t t, int64_t R, int64_t n,
                const std::vector<const float*>& slot, int64_t h, std::vector<float>& kt, float* scores) {
  const int64_t max_ctx = d.pps * d.ps, k_off = 2 * h * d.hdc;
  for (int64_t jb = 0; jb < n; jb += kKeyBlock) {
    const int64_t nb = std::min(kKeyBlock, n - jb);
    for (int64_t jj = 0; jj < kKeyBlock; ++jj) {
      const float* k = jj < nb ? slot[jb + jj] + k_off : nullptr;
      for (int64_t i = 0; i < d.hd; ++i) kt[i * kKeyBlock + jj] = k ? k[i] : 0.f;
    }
    // Query vectors (row, head of this kv head) kRowsAtOnce at a time: independent chains of
    // multiply-adds, each kt row loaded once for all of them. Rows past their position compute
    // scores nobody reads.
    const int64_t vectors = R * d.g;
    for (int64_t v0 = 0; v0 < vectors; v0 += kRowsAtOnce) {
      const int64_t nv = std::min(kRowsAtOnce, vectors - v0);
      int32_t reach = 0;
      for (int64_t v = v0; v < v0 + nv; ++v) reach = std::max(reach, pos[t + v / d.g]);
      if (jb > reach) continue;
      const float* q[kRowsAtOnce];
      for (int64_t v = 0; v < kRowsAtOnce; ++v) {
        const int64_t vv = v0 + std::min(v, nv - 1), r = vv / d.g, head = h * d.g + vv % d.g;
        q[v] = Q + ((t + r) * d.nq + head) * d.hd;
      }
      float acc[kRowsAtOnce][kKeyBlock] = {};
      for (int64_t i = 0; i < d.hd; ++i) {
        const float* row = kt.data() + i * kKeyBlock;
        for (int64_t v = 0; v < kRowsAtOnce; ++v) {
          const float qi = q[v][i];
#pragma omp simd
          for (int64_t jj = 0; jj < kKeyBlock; ++jj) acc[v][jj] += qi * row[jj];
        }
      }
      for (int64_t v = 0; v < nv; ++v) {
        const int64_t r = (v0 + v) / d.g, head = h * d.g + (v0 + v) % d.g;
        std::copy(acc[v], acc[v] + nb, scores + (r * d.nq + head) * max_ctx + jb);
      }
    }
  }
}

// One tile: rows [t, t + R) of one sequence (its pages), seeing keys 0..n-1 at most. Each pass
// walks the context in order, all heads of a slot at once, so a page is read as one run of bytes.
void AttendTile(const Shapes& d, const float* Q, const float* KV, const int32_t* pos, const int32_t* pages,
                int64_t t, int64_t R, int64_t n, std::vector<float>& scores, std::vector<const float*>& slot,
                std::vector<float>& kt, std::vector<float>& inv, float* O) {
  const int64_t stride = d.nkv * 2 * d.hdc, max_ctx = d.pps * d.ps;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t page = std::clamp<int64_t>(pages[j / d.ps], 0, d.P - 1);
    slot[j] = KV + (page * d.ps + j % d.ps) * stride;
  }
  // scores[(r * nq + head) * max_ctx + j]: query head `head` = h * g + gi reads kv head h.
  if (R == 1) {
    DecodeScores(d, Q + t * d.nq * d.hd, n, slot, scores.data());
  } else {
    for (int64_t h = 0; h < d.nkv; ++h) TileScores(d, Q, pos, t, R, n, slot, h, kt, scores.data());
  }
  for (int64_t r = 0; r < R; ++r) {
    const int64_t last = std::min<int64_t>(pos[t + r], n - 1);
    for (int64_t head = 0; head < d.nq; ++head) {
      float* s = scores.data() + (r * d.nq + head) * max_ctx;
      float m = -INFINITY, sum = 0.f;
#pragma omp simd reduction(max : m)
      for (int64_t j = 0; j <= last; ++j) m = std::max(m, s[j]);
#pragma omp simd reduction(+ : sum)
      for (int64_t j = 0; j <= last; ++j) {
        s[j] = dp_kernels::Exp(s[j] - m);
        sum += s[j];
      }
      inv[r * d.nq + head] = 1.f / sum;
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t r = 0; r < R; ++r) {
      if (j > pos[t + r]) continue;
      float* o = O + (t + r) * d.nq * d.hd;
      for (int64_t head = 0; head < d.nq; ++head) {
        const int64_t row = r * d.nq + head;
        Axpy(scores[row * max_ctx + j] * inv[row], slot[j] + (2 * (head / d.g) + 1) * d.hdc, o + head * d.hd, d.hd);
      }
    }
  }
}

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> kv,
                          ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::S32> positions,
                          ffi::Buffer<ffi::S32> seq_index, ffi::Buffer<ffi::PRED> run,
                          ffi::Buffer<ffi::S32> page_table, ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = kv.dimensions(), pd = page_table.dimensions();
  if (qd.size() != 3 || kd.size() != 5 || pd.size() != 2 || kd[3] % 2 != 0 || qd[1] % (kd[3] / 2) != 0 ||
      kd[4] < qd[2]) {
    return ffi::Error::InvalidArgument("dp_paged_attention: q [T, nq, hd], kv [L, P, page_size, 2*nkv, hdc >= hd] "
                                       "and page_table [S, pages] expected, nq a multiple of nkv");
  }
  Shapes d{qd[0], qd[1], qd[2], kd[1], kd[2], kd[3] / 2, kd[4], qd[1] / (kd[3] / 2), pd[0], pd[1]};
  const int64_t L = kd[0], max_ctx = d.pps * d.ps;
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);
  const float* Q = q.typed_data();
  const float* KV = kv.typed_data() + l * d.P * d.ps * d.nkv * 2 * d.hdc;
  const int32_t* table = page_table.typed_data();
  float* O = out->typed_data();
  std::fill(O, O + d.T * d.nq * d.hd, 0.f);
  const int32_t* seq = seq_index.typed_data();
  const bool* go = run.typed_data();
  std::vector<int32_t> pos(positions.typed_data(), positions.typed_data() + d.T);
  for (auto& p : pos) p = std::clamp<int32_t>(p, 0, max_ctx - 1);
  std::vector<std::array<int64_t, 4>> tiles;  // first row, rows, sequence, keys seen
  for (int64_t t = 0; t < d.T;) {
    if (!go[t]) {
      ++t;
      continue;
    }
    int64_t end = t;
    int32_t reach = 0;
    while (end < d.T && end - t < kMaxTileRows && go[end] && seq[end] == seq[t]) reach = std::max(reach, pos[end++]);
    tiles.push_back({t, end - t, std::clamp<int64_t>(seq[t], 0, d.S - 1), reach + 1});
    t = end;
  }
  // One core reads the cache at a fraction of the memory's bandwidth: the pool's threads share the
  // tiles (a decode step's are many and alike), each with scratch of its own.
  const int64_t workers = dp_kernels::Workers(pool, tiles.size());
  std::vector<std::vector<float>> scores(workers), kt(workers), inv(workers);
  std::vector<std::vector<const float*>> slot(workers);
  dp_kernels::ParallelFor(pool, tiles.size(), [&](int64_t w, int64_t i) {
    if (scores[w].empty()) {
      scores[w].resize(kMaxTileRows * d.nq * max_ctx);
      kt[w].resize(d.hd * kKeyBlock);
      inv[w].resize(kMaxTileRows * d.nq);
      slot[w].resize(max_ctx);
    }
    auto [t, R, s, n] = tiles[i];
    AttendTile(d, Q, KV, pos.data(), table + s * d.pps, t, R, n, scores[w], slot[w], kt[w], inv[w], O);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // kv
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer
                                  .Arg<ffi::Buffer<ffi::S32>>()   // positions
                                  .Arg<ffi::Buffer<ffi::S32>>()   // seq_index
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // run
                                  .Arg<ffi::Buffer<ffi::S32>>()   // page_table
                                  .Ret<ffi::Buffer<ffi::F32>>());  // out
