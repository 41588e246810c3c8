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
#include <memory>
#include <thread>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMaxTileRows = 16;  // consecutive rows of one sequence that share one read of K/V

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

// One tile: rows [t, t + R) of one sequence (its pages), seeing keys 0..n-1 at most. Each pass
// walks the context in order, all heads of a slot at once, so a page is read as one run of bytes.
void AttendTile(const Shapes& d, const float* Q, const float* KV, const int32_t* pos, const int32_t* pages,
                int64_t t, int64_t R, int64_t n, std::vector<float>& scores, std::vector<const float*>& slot,
                float* O) {
  const int64_t stride = d.nkv * 2 * d.hdc, max_ctx = d.pps * d.ps, qrows = R * d.nq;
  for (int64_t j = 0; j < n; ++j) {
    const int64_t page = std::clamp<int64_t>(pages[j / d.ps], 0, d.P - 1);
    slot[j] = KV + (page * d.ps + j % d.ps) * stride;
  }
  // scores[(r * nq + head) * max_ctx + j]: query head `head` = h * g + gi reads kv head h.
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t r = 0; r < R; ++r) {
      if (j > pos[t + r]) continue;
      const float* q = Q + (t + r) * d.nq * d.hd;
      for (int64_t head = 0; head < d.nq; ++head)
        scores[(r * d.nq + head) * max_ctx + j] = Dot(q + head * d.hd, slot[j] + 2 * (head / d.g) * d.hdc, d.hd);
    }
  }
  std::vector<float> inv(qrows);
  for (int64_t r = 0; r < R; ++r) {
    const int64_t last = std::min<int64_t>(pos[t + r], n - 1);
    for (int64_t head = 0; head < d.nq; ++head) {
      float* s = scores.data() + (r * d.nq + head) * max_ctx;
      float m = -INFINITY, sum = 0.f;
      for (int64_t j = 0; j <= last; ++j) m = std::max(m, s[j]);
      for (int64_t j = 0; j <= last; ++j) {
        s[j] = std::exp(s[j] - m);
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

// Tiles cut from the rows that run, shared by the threads that take them one at a time. Held by
// shared_ptr: a helper the pool starts late finds no tile left and touches nothing else.
struct Work {
  Shapes d;
  const float *Q, *KV;
  const int32_t *pos, *table;
  float* O;
  std::vector<std::array<int64_t, 4>> tiles;  // first row, rows, sequence, keys seen
  std::atomic<int64_t> next{0}, done{0};

  void Run() {
    std::vector<float> scores(kMaxTileRows * d.nq * d.pps * d.ps);
    std::vector<const float*> slot(d.pps * d.ps);
    const int64_t count = tiles.size();
    for (int64_t i; (i = next.fetch_add(1)) < count; done.fetch_add(1, std::memory_order_release)) {
      auto [t, R, seq, n] = tiles[i];
      AttendTile(d, Q, KV, pos, table + seq * d.pps, t, R, n, scores, slot, O);
    }
  }
};

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
  auto work = std::make_shared<Work>();
  Work& w = *work;
  w.d = Shapes{qd[0], qd[1], qd[2], kd[1], kd[2], kd[3] / 2, kd[4], qd[1] / (kd[3] / 2), pd[0], pd[1]};
  const Shapes& d = w.d;
  const int64_t L = kd[0], max_ctx = d.pps * d.ps;
  const int64_t l = std::clamp<int64_t>(layer.typed_data()[0], 0, L - 1);
  w.Q = q.typed_data();
  w.KV = kv.typed_data() + l * d.P * d.ps * d.nkv * 2 * d.hdc;
  w.table = page_table.typed_data();
  w.O = out->typed_data();
  std::fill(w.O, w.O + d.T * d.nq * d.hd, 0.f);
  const int32_t* seq = seq_index.typed_data();
  const bool* go = run.typed_data();
  std::vector<int32_t> clipped(positions.typed_data(), positions.typed_data() + d.T);
  for (auto& p : clipped) p = std::clamp<int32_t>(p, 0, max_ctx - 1);
  w.pos = clipped.data();
  for (int64_t t = 0; t < d.T;) {
    if (!go[t]) {
      ++t;
      continue;
    }
    int64_t end = t;
    int32_t reach = 0;
    while (end < d.T && end - t < kMaxTileRows && go[end] && seq[end] == seq[t]) reach = std::max(reach, clipped[end++]);
    w.tiles.push_back({t, end - t, std::clamp<int64_t>(seq[t], 0, d.S - 1), reach + 1});
    t = end;
  }
  // One core reads the cache at a fraction of the memory's bandwidth: the pool's threads share the
  // tiles (decode steps are many tiles of similar size), this thread among them.
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), w.tiles.size()) - 1;
  for (int64_t i = 0; i < helpers; ++i) pool.Schedule([work] { work->Run(); });
  w.Run();
  while (w.done.load(std::memory_order_acquire) < static_cast<int64_t>(w.tiles.size())) std::this_thread::yield();
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
