"""Measuring tools: step timers and medians, peak memory, the machine's matmul rate, cache probes.

Nothing here knows the network: each tool takes a function to time or a block to watch.
"""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any


def cpu_threads() -> int:
    """The CPUs this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def step_times(fn: Callable[[], Any], steps: int, warmup: int) -> list[float]:
    """Seconds of each of `steps` calls of `fn`, after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def rates(times: list[float], batch: int, flops_per_image: float, prefix: str
          ) -> dict[str, float]:
    """Step milliseconds (median, min, max), images/s and GFLOP/s of timed steps."""
    median = statistics.median(times)
    ips = batch / median
    return {f"{prefix}_step_ms": 1e3 * median,
            f"{prefix}_step_ms_min": 1e3 * min(times),
            f"{prefix}_step_ms_max": 1e3 * max(times),
            f"{prefix}_images_per_sec": ips,
            f"{prefix}_gflops": ips * flops_per_image / 1e9}


def mb(x: float | None) -> float | None:
    return None if x is None else x / 2**20


class PeakRss:
    """Peak resident set size of this process while the block runs.

    On Linux the kernel keeps the high-water mark itself: writing 5 to
    /proc/self/clear_refs resets it to the current size, and VmHWM in
    /proc/self/status reads it back, at no cost to the block being timed.
    Elsewhere a thread samples the RSS every `interval` seconds; it takes a
    little time from the timed steps, and it can miss short peaks.
    """

    def __init__(self, interval: float = 0.05):
        self.interval = interval
        self.peak = 0
        self.before = 0
        self.minor_faults = 0
        self.method = "sampled"
        self._faults = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @staticmethod
    def _status_kb(field: str) -> int | None:
        try:
            with open("/proc/self/status") as f:
                for line in f:
                    if line.startswith(field + ":"):
                        return int(line.split()[1])
        except (OSError, ValueError, IndexError):
            pass
        return None

    def _sample(self) -> int:
        kb = self._status_kb("VmRSS")
        if kb is not None:
            return kb * 1024
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # lifetime peak

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._sample())
            self._stop.wait(self.interval)

    def __enter__(self):
        self.before = self.peak = self._sample()
        self._faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            if self._status_kb("VmHWM") is not None:
                self.method = "kernel high-water mark"
                return self
        except OSError:
            pass
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        # Minor page faults: memory the process touched for the first time (or again,
        # after the allocator gave it back to the kernel).
        self.minor_faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - self._faults
        if self._thread is None:
            self.peak = max(self.peak, (self._status_kb("VmHWM") or 0) * 1024)
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._sample())

    def report(self, steps: int) -> dict[str, Any]:
        """The figures of a block that ran `steps` train steps, for the benchmark's JSON."""
        return {"peak_rss_mb": mb(self.peak), "peak_rss_method": self.method,
                "rss_before_mb": mb(self.before),
                "train_page_faults_per_step": self.minor_faults / steps}


def device_peak_bytes() -> int | None:
    """Sum over local devices of the allocator's peak, where the backend reports it."""
    import jax
    total, seen = 0, False
    for d in jax.local_devices():
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - backends without allocator stats
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            total += stats["peak_bytes_in_use"]
            seen = True
    return total if seen else None


def matmul_gflops(n: int, dtype: str, steps: int = 5) -> float:
    """Measured dense (n x n) @ (n x n) rate of JAX on the default device, GFLOP/s."""
    import jax
    import jax.numpy as jnp
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32).astype(dtype)
    f = jax.jit(jnp.matmul)
    times = step_times(lambda: f(a, b).block_until_ready(), steps, 1)
    return 2 * n**3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------
# JAX's persistent compilation cache
# ----------------------------------------------------------------------------

def cache_events() -> dict[str, int]:
    """Counts of JAX's persistent-cache events from now on (a dictionary that fills up)."""
    import jax
    counts: dict[str, int] = {}

    def listener(event: str, **kwargs):
        del kwargs
        if event.startswith("/jax/compilation_cache/"):
            counts[event] = counts.get(event, 0) + 1
    jax.monitoring.register_event_listener(listener)
    return counts


def _use_cache_dir(path: str | None) -> None:
    import jax
    from jax._src import compilation_cache
    jax.config.update("jax_compilation_cache_dir", path)
    compilation_cache.reset_cache()


@contextlib.contextmanager
def fresh_cache() -> Iterator[str]:
    """A new, empty persistent compilation cache for the block (every entry kept)."""
    import jax
    cache_dir = tempfile.mkdtemp(prefix="inception_flax_bench_cache_")
    previous_dir = jax.config.jax_compilation_cache_dir
    previous_min = jax.config.jax_persistent_cache_min_compile_time_secs
    try:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
        _use_cache_dir(cache_dir)
        yield cache_dir
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous_min)
        _use_cache_dir(previous_dir)
        shutil.rmtree(cache_dir, ignore_errors=True)
