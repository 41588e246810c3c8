// What the CPU kernels share: a vectorizable exp, and independent items run on XLA's intra-op pool.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace dp_kernels {

// exp(x) to about one ulp for x in [-87, 88] (clamped there): a Cody-Waite reduction to
// |r| <= ln2/2 and a degree-6 polynomial, in plain arithmetic so that a loop of it vectorizes
// (a call to std::exp does not).
inline float Exp(float x) {
  x = std::min(std::max(x, -87.0f), 88.0f);
  const float n = std::floor(x * 1.44269504f + 0.5f);
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// fn(worker, item) for every item in [0, items), each once, on this thread (worker 0) and up to
// the pool's other threads (workers 1..): returns when every item is done. Items are taken one at
// a time, so uneven items balance. A helper the pool starts late finds nothing left and calls
// nothing: only the shared counters outlive this call. Workers are fewer than Workers(pool, items).
struct ForState {
  std::atomic<int64_t> next{0}, done{0};
  int64_t items = 0;
  std::function<void(int64_t, int64_t)> fn;

  void Run(int64_t worker) {
    for (int64_t i; (i = next.fetch_add(1)) < items; done.fetch_add(1, std::memory_order_release)) fn(worker, i);
  }
};

inline int64_t Workers(xla::ffi::ThreadPool& pool, int64_t items) {
  return std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), items));
}

template <typename Fn>
void ParallelFor(xla::ffi::ThreadPool& pool, int64_t items, Fn fn) {
  auto state = std::make_shared<ForState>();
  state->items = items;
  state->fn = std::move(fn);
  for (int64_t w = 1; w < Workers(pool, items); ++w) pool.Schedule([state, w] { state->Run(w); });
  state->Run(0);
  while (state->done.load(std::memory_order_acquire) < items) std::this_thread::yield();
}

}  // namespace dp_kernels
