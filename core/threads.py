"""How many CPU threads gptx's own work uses: the CPUs this process may run on, less the ones
other processes keep busy, re-read while training.

Why: torch's OpenMP threads spin at each parallel region's barrier. When another process takes
one of two cores, the thread that shares it is descheduled for a whole time slice while its
partner spins, and a training step that needs both threads waits for the slow one: on a 2-core
machine beside one busy process, training with torch's default 2 threads kept about a seventh
of its quiet speed, with one thread well over its fair half (docs/performance.md, "Busy
machines"). Passive waiting is no fix: it costs a third of the quiet speed. So gptx uses as many
threads as there are CPUs free, and follows the load as it changes.

- **Available CPUs**: the process's CPU affinity (``taskset``, ``docker --cpuset-cpus``),
  capped by a cgroup CPU quota (``docker --cpus``, Kubernetes limits) rounded up.
- **Busy elsewhere**: the CPU time the available CPUs spent on other processes over the last
  interval (``/proc/stat`` less this process's own ``/proc/self/stat``), in CPUs.
- **Threads** = the available CPUs less the busy ones, a CPU counting as taken once others use
  more than ``TAKEN`` of it; at least 1. Training re-reads this every ``INTERVAL`` seconds
  between steps; evaluation and generation choose once when they start.

An explicit count wins and is never changed: ``training.threads``, ``--threads``, or
``OMP_NUM_THREADS`` in the environment (torchrun sets it to 1 for each of several processes).
Where ``/proc`` is missing (macOS, Windows) gptx keeps torch's default.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
import time
from pathlib import Path
from typing import Optional

TAKEN = 0.3  # others using more than this share of a CPU make it theirs: our thread there would stall each step
INTERVAL = 2.0  # seconds between re-reads while training: a few /proc reads, far below a step's cost
FIRST_INTERVAL = 0.1  # the first reading: as short as choose_threads's sample, so training starts on it


def allowed_cpus() -> list[int]:
    """The CPUs the scheduler may run this process on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cgroup_dir() -> Optional[Path]:
    try:  # cgroup v2: one line "0::/path"
        for line in Path("/proc/self/cgroup").read_text().splitlines():
            if line.startswith("0::"):
                return Path("/sys/fs/cgroup") / line[3:].lstrip("/")
    except OSError:
        pass
    return None


def cgroup_cpu_limit() -> Optional[float]:
    """The cgroup's CPU quota in CPUs (``cpu.max`` in v2, ``cpu.cfs_quota_us`` in v1), or None."""
    v2 = [d / "cpu.max" for d in (_cgroup_dir(), Path("/sys/fs/cgroup")) if d is not None]
    for path in v2:
        try:
            quota, period = path.read_text().split()[:2]
        except (OSError, ValueError):
            continue
        return None if quota == "max" else int(quota) / int(period)
    try:
        quota = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_quota_us").read_text())
        period = int(Path("/sys/fs/cgroup/cpu/cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return quota / period if quota > 0 else None


def available_cpus() -> int:
    """The CPUs this process may use: its affinity, capped by a cgroup quota (rounded up)."""
    n = len(allowed_cpus())
    limit = cgroup_cpu_limit()
    return max(1, min(n, math.ceil(limit))) if limit else n


def explicit_threads() -> Optional[int]:
    """A thread count the user set in the environment (OMP_NUM_THREADS), which gptx keeps."""
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    return int(value) if value.isdigit() and int(value) > 0 else None


@dataclasses.dataclass(frozen=True)
class CpuSample:
    """Clock ticks the allowed CPUs spent busy and in all, and this process's own, at one moment."""
    busy: int
    total: int
    own: int

    @classmethod
    def read(cls, cpus: list[int]) -> "CpuSample":
        wanted = {f"cpu{c}" for c in cpus}
        busy = total = 0
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if name in wanted:  # user nice system idle iowait irq softirq steal (guest is in user)
                    values = [int(v) for v in fields[:8]]
                    total += sum(values)
                    busy += sum(values) - values[3] - values[4]
        with open("/proc/self/stat") as f:  # the command name may hold spaces: fields follow its ')'
            fields = f.read().rsplit(")", 1)[1].split()
        return cls(busy, total, int(fields[11]) + int(fields[12]))  # utime + stime, every thread of this process


def busy_elsewhere(before: CpuSample, after: CpuSample, n_cpus: int) -> float:
    """CPUs' worth of time other processes took between two samples."""
    elapsed = after.total - before.total
    if elapsed <= 0:
        return 0.0
    others = max(0, (after.busy - before.busy) - (after.own - before.own))
    return others / elapsed * n_cpus


def threads_for(available: int, busy: float) -> int:
    """The thread count for ``available`` CPUs of which ``busy`` are taken by others."""
    return max(1, min(available, math.floor(available - busy + TAKEN)))


class ThreadGovernor:
    """Sets torch's intra-op thread count to the free CPUs, and keeps it there: ``tick()`` between
    steps re-reads the load at most every INTERVAL seconds. The first reading decides at once;
    later a change needs two readings in a row, so a burst (a browser tab, a compiler) does not
    move it. ``fixed`` (or OMP_NUM_THREADS) pins the count."""

    def __init__(self, fixed: Optional[int] = None):
        import torch

        self.torch = torch
        self.fixed = fixed or explicit_threads()
        self.cpus = allowed_cpus()
        self.available = available_cpus()
        self.changes: list[tuple[float, int]] = []  # (seconds since start, threads): what the run chose
        self.t0 = time.perf_counter()
        self.sample = self._sample()
        self.candidate: Optional[int] = None  # a change read once, waiting for its second reading
        self.decided = False
        self.busy = 0.0  # the last reading
        self.held = 0  # CPUs left to this process's own other work (hold)
        # torch's default is the machine's cores, which a container's quota can make far too many
        torch.set_num_threads(self.fixed or self.available)
        self.next = math.inf if self.fixed or self.sample is None else self.t0 + FIRST_INTERVAL

    def _sample(self) -> Optional[CpuSample]:
        try:
            return CpuSample.read(self.cpus)
        except (OSError, ValueError, IndexError):
            return None  # no /proc: torch's default stays

    @property
    def threads(self) -> int:
        return self.torch.get_num_threads()

    def first_reading(self) -> Optional[str]:
        """The first decision, taken before the first step (waiting out what is left of the
        FIRST_INTERVAL reading): a step run with more threads than CPUs free is the slowest of all,
        seconds for a step that takes a fraction of one, and the first one would otherwise pay it."""
        if not self.fixed and not self.decided and self.next < math.inf:
            time.sleep(max(0.0, self.next - time.perf_counter()))
        return self.tick()

    def hold(self, cpus: int) -> None:
        """Leave ``cpus`` of the free CPUs to this process's own other work (the MLflow run starting
        in a background thread): beside a busy thread, torch's spinning threads stall each other
        just as beside a busy process. Applies at once, to the last reading; says nothing, since
        the load did not change."""
        self.held = cpus
        if self.fixed or not self.decided:
            return  # the first reading counts it
        want = self.for_load(self.busy)
        self.candidate = None
        if want != self.threads:
            self.torch.set_num_threads(want)
            self.changes.append((round(time.perf_counter() - self.t0, 1), want))

    def for_load(self, busy: float) -> int:
        """The thread count for ``busy`` CPUs taken by others and ``held`` by this process."""
        return threads_for(max(1, self.available - self.held), busy)

    def tick(self) -> Optional[str]:
        """Re-read the load when due; a line saying what changed, or None."""
        now = time.perf_counter()
        if self.fixed or now < self.next:
            return None
        sample = self._sample()
        if sample is None:
            self.next = math.inf
            return None
        busy = busy_elsewhere(self.sample, sample, len(self.cpus))
        self.sample, self.next, self.busy = sample, now + INTERVAL, busy
        want, before = self.decide(busy), self.threads
        if want is None:
            return None
        self.torch.set_num_threads(want)
        self.changes.append((round(now - self.t0, 1), want))
        if threads_for(self.available, busy) == before:  # only what is held moved it: not the user's business
            return None
        return (f"threads {before} -> {want}: other processes use {busy:.1f} of the {self.available} CPUs "
                "(training.threads or OMP_NUM_THREADS fixes the count)")

    def decide(self, busy: float) -> Optional[int]:
        """The new thread count for a reading of ``busy`` CPUs, or None to keep the current one."""
        want = self.for_load(busy)
        confirmed = not self.decided or want == self.candidate
        self.decided, self.candidate = True, (None if want == self.threads else want)
        if want == self.threads or not confirmed:
            return None
        self.candidate = None
        return want


def choose_threads(requested: Optional[int] = None, sample_seconds: float = 0.1) -> int:
    """A thread count for work that chooses once (evaluation, generation): ``requested`` or
    OMP_NUM_THREADS when set, else the CPUs free over a short sample, read once per process (an
    export verifies through several onnxruntime sessions: one reading serves them all)."""
    return requested or explicit_threads() or _free_threads(sample_seconds)


def spinning_pays(threads: int) -> bool:
    """Whether onnxruntime's worker threads may spin while they wait for the next parallel section:
    only with two or more threads, each with a CPU nobody else used over the same short reading
    ``choose_threads`` takes (read once per process). Spinning skips waking a sleeping thread for each
    of a decode step's ~130 short kernels, which int4 decoding feels most; a thread spinning on a CPU
    another process wants stalls both, so a busy machine keeps sleeping threads (the figures:
    docs/performance.md, "Load changes the ranking")."""
    return 1 < threads <= _free_threads(0.1)


@functools.lru_cache(maxsize=None)
def _free_threads(sample_seconds: float) -> int:
    cpus = allowed_cpus()
    try:
        before = CpuSample.read(cpus)
        time.sleep(sample_seconds)
        after = CpuSample.read(cpus)
    except (OSError, ValueError, IndexError):
        return available_cpus()
    return threads_for(available_cpus(), busy_elsewhere(before, after, len(cpus)))
