// The phases of the fused decode step's parallel region: chunks handed out by atomic counters.
//
// A phase (one GEMV's output columns, or the heads of QKV + attention) is cut into `total`
// chunks of fixed boundaries. Every thread of the region claims chunks until none is left,
// counts each finished one in `done`, and waits until done == total before it goes on to the
// next phase (which reads this one's whole output).
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
//
// Claim order: the chunks are split into one contiguous slice per thread (up to kMaxSlices), each
// with its own counter; a thread claims its home slice's chunks in order, then helps the others
// (same order, from where their counters stand). A weight is thus streamed by each thread as one
// long sequential run, as with a static split: one shared counter handed out chunks alternately,
// so every ~64 KiB the hardware prefetchers of both cores had to find a new stream (2 threads
// read 25 GB/s that way vs 30 with contiguous halves, 4-row fp32 GEMV over 495 MB here).
#pragma once

#include <algorithm>
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

struct Claimer {  // one thread's place in the phases: its home slice among `slices`
  int home = 0, slices = 1;
  int64_t* waited_ns = nullptr;  // add the nanoseconds spent waiting for others' chunks here
};

struct WorkPhase {
  static constexpr int kMaxSlices = 8;
  struct alignas(64) Counter {
    std::atomic<int32_t> v{0};
  };
  Counter next[kMaxSlices];  // chunks claimed so far in each slice
  alignas(64) std::atomic<int32_t> done{0};

  // run(c) for every chunk c < total this thread claims; prep() once before its first chunk
  // (per-thread inputs, e.g. its own LayerNorm of x); then wait for every chunk to be done
  template <typename Prep, typename Run>
  void run(int32_t total, const Claimer& who, Prep&& prep, Run&& run_chunk) {
    const int ns = std::max(1, std::min(who.slices, kMaxSlices));
    bool ready = false;
    for (int i = 0; i < ns; ++i) {
      const int sl = (who.home + i) % ns;
      const int32_t b = static_cast<int32_t>(int64_t{total} * sl / ns);
      const int32_t e = static_cast<int32_t>(int64_t{total} * (sl + 1) / ns);
      for (int32_t c; (c = b + next[sl].v.fetch_add(1, std::memory_order_relaxed)) < e;) {
        if (!ready) {
          prep();
          ready = true;
        }
        run_chunk(c);
        if (done.fetch_add(1, std::memory_order_acq_rel) + 1 == total) done.notify_all();
      }
    }
    if (done.load(std::memory_order_acquire) == total) return;
    const auto t0 = who.waited_ns ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
    wait_done(total);
    if (who.waited_ns) *who.waited_ns += (std::chrono::steady_clock::now() - t0).count();
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
