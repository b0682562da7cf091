// The phases of the fused decode step's parallel region: chunks handed out by an atomic counter.
//
// A phase (one GEMV's output columns, or the heads of QKV + attention) is cut into `total`
// chunks of fixed boundaries. Every thread of the region claims chunks with next.fetch_add until
// none is left, counts each finished one in `done`, and waits until done == total before it goes
// on to the next phase (which reads this one's whole output).
//
// Design choice, vs a static share per thread and a barrier: a phase waits for the chunks that
// were claimed, never for a thread that has not arrived. On a busy or oversubscribed machine a
// thread of ours may be off its core for a whole time slice (ms); with a barrier every phase
// (4 per layer) would wait for it, and libgomp's barrier would spin up to GOMP_SPINCOUNT (300,000)
// pauses, ~15 ms, on the core that thread needs (2 threads measured ~10x slower than 1 at load 12
// on 2 cores). Here the threads that run take its chunks and it joins whatever phase is current
// when it is back; the only full join is the end of the region. Chunk boundaries do not depend on
// the thread count and each output is computed whole by one thread, so results are the same bits
// for any number of threads. The wait spins a bounded while (the usual case on a quiet machine:
// the last chunk ends within microseconds), then sleeps on a futex (C++20 atomic wait/notify).
// GPT2_FAST_CPU_SPIN=<pauses> (default 2000, ~50-100 us; 0: sleep at once) is for A/B runs.
#pragma once

#include <atomic>
#include <chrono>
#include <cstdint>
#include <cstdlib>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GPT2F_PAUSE() _mm_pause()
#else
#define GPT2F_PAUSE() ((void)0)
#endif

namespace gpt2_fast {
namespace cpu {

inline int spin_pauses() {
  static const int n = [] {
    const char* v = std::getenv("GPT2_FAST_CPU_SPIN");
    return v && *v ? std::atoi(v) : 2000;
  }();
  return n;
}

struct WorkPhase {
  std::atomic<int32_t> next{0}, done{0};

  // run(c) for every chunk c < total this thread claims; prep() once before its first chunk
  // (per-thread inputs, e.g. its own LayerNorm of x); then wait for every chunk to be done
  // (adding the nanoseconds waited to *waited_ns when given)
  template <typename Prep, typename Run>
  void run(int32_t total, Prep&& prep, Run&& run_chunk, int64_t* waited_ns = nullptr) {
    bool ready = false;
    for (int32_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < total;) {
      if (!ready) {
        prep();
        ready = true;
      }
      run_chunk(c);
      if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == total) done.notify_all();
    }
    if (done.load(std::memory_order_acquire) == total) return;
    const auto t0 = waited_ns ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    wait_done(total);
    if (waited_ns) *waited_ns += (std::chrono::steady_clock::now() - t0).count();
  }

  void wait_done(int32_t total) {
    for (int i = spin_pauses(); i > 0; --i) {
      if (done.load(std::memory_order_acquire) == total) return;
      GPT2F_PAUSE();
    }
    for (int32_t v; (v = done.load(std::memory_order_acquire)) != total;) done.wait(v, std::memory_order_acquire);
  }
};

}  // namespace cpu
}  // namespace gpt2_fast
