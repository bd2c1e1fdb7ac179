// Splitting rows of a map among a team of OpenMP threads, for the native CPU kernels.
#pragma once

#include <omp.h>

#include <algorithm>
#include <cstdint>

namespace inception_flax {

// At least a few thousand elements per thread (the Python side decides when a map is
// worth more than one thread: `threads` is 1 below that).
inline int TeamSize(int64_t threads, int64_t elements) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(threads, elements / 4096)));
}

// body(lo, hi, thread) over `rows` of `cols` elements, split evenly among the team.
template <typename Body>
int ForRows(int64_t rows, int64_t cols, int64_t threads, Body body) {
  int team = TeamSize(threads, rows * cols);
#pragma omp parallel num_threads(team) if (team > 1)
  {
    int t = omp_get_thread_num(), n = omp_get_num_threads();
    int64_t per = (rows + n - 1) / n, lo = std::min(rows, t * per);
    body(lo, std::min(rows, lo + per), t);
  }
  return team;
}

}  // namespace inception_flax
