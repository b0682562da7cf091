// A barrier for the threads of one OpenMP region (the fused decode step's phases).
//
// Design: spin a bounded while, then sleep on a futex (C++20 std::atomic::wait / notify_all).
// On a quiet machine the threads of a phase finish within microseconds of each other and the
// spin catches them with no system call. On a busy or oversubscribed machine the thread being
// waited for may be off its core for a whole time slice; libgomp's own barrier would spin for up
// to GOMP_SPINCOUNT (300,000) pauses, ~15 ms, on the very core that thread needs, which made
// 2 threads ~10x slower than 1 at load 12 on 2 cores. Here the waste per barrier is bounded by
// kSpinPauses (~50-100 us), after which the waiter gives its core away until it is woken.
// GPT2_FAST_CPU_SPIN=<pauses> overrides the spin (0: sleep at once), for A/B runs.
#pragma once

#include <atomic>
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

class SpinBarrier {
 public:
  explicit SpinBarrier(int n = 1) : n_(n) {}
  void reset(int n) { n_ = n; }  // before any thread waits (an `omp single` of the region)

  // every one of the n threads calls wait(); none returns before all have called it
  void wait() {
    if (n_ <= 1) return;
    const uint32_t ph = phase_.load(std::memory_order_acquire);
    if (arrived_.fetch_add(1, std::memory_order_acq_rel) == n_ - 1) {  // the last one releases
      arrived_.store(0, std::memory_order_relaxed);
      phase_.store(ph + 1, std::memory_order_release);
      phase_.notify_all();
      return;
    }
    for (int i = spin_pauses(); i > 0; --i) {
      if (phase_.load(std::memory_order_acquire) != ph) return;
      GPT2F_PAUSE();
    }
    while (phase_.load(std::memory_order_acquire) == ph) phase_.wait(ph, std::memory_order_acquire);
  }

 private:
  int n_;
  std::atomic<int> arrived_{0};
  std::atomic<uint32_t> phase_{0};
};

}  // namespace cpu
}  // namespace gpt2_fast
