// A stress run of mlx_common.h's Helpers and split_rows, built by tests/test_mlx_helpers.py
// (with ThreadSanitizer where the compiler has it): three threads hand out jobs at once, some
// after pauses long enough for the helpers to fall asleep; every part of every job must run
// exactly once. Exits 1 with a count of the misses.
#include <cstdio>

#include "mlx_common.h"

using mlx_ext::Helpers;

int main() {
  std::atomic<long> misses{0};
  auto caller = [&](int seed) {
    for (int round = 0; round < 2000; ++round) {
      const int parts = 2 + (round + seed) % 3;
      std::vector<std::atomic<int>> hits(64);
      std::atomic<int> next{0};
      auto work = [&] {
        for (int i = next.fetch_add(1); i < 64; i = next.fetch_add(1)) hits[i]++;
      };
      Helpers::get().run(parts, work);
      for (auto& h : hits) misses += h.load() != 1;
      if (round % 400 == 0) std::this_thread::sleep_for(std::chrono::microseconds(300));
    }
  };
  std::thread a(caller, 0), b(caller, 1);
  caller(2);
  a.join();
  b.join();
  std::vector<int> rows(1000, 0);
  for (int round = 0; round < 200; ++round)
    mlx_ext::split_rows(1000, 1 << 20, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) rows[r]++;
    });
  for (int r : rows) misses += r != 200;
  std::printf("misses %ld\n", misses.load());
  return misses != 0;
}
