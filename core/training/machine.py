"""Where and how a run computes: the device, CPU features, glibc's allocator, the dtype and autocast
(shared by training, evaluation and gptx bench)."""
from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from gptx.errors import ConfigError, GptxError
from gptx.numeric import env_int


def process_age() -> Optional[float]:
    """Seconds since this process started (Linux's /proc; None elsewhere): what start-up costs,
    imports included, measured from inside."""
    try:
        with open("/proc/self/stat") as f:  # the command name may hold spaces: fields follow its ')'
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])  # field 22, starttime
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return max(0.0, uptime - start_ticks / os.sysconf("SC_CLK_TCK"))


def pick_device(tc) -> torch.device:
    if tc.device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", env_int("LOCAL_RANK", 0))
        return torch.device("cpu")
    dev = torch.device(tc.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("is 'cuda' but no CUDA device is available", "training.device")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"is {tc.device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)", "training.device")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("is 'mps' but no Apple GPU is available", "training.device")
    return dev


def cpu_flags() -> set[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo); empty where unknown."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


KEEP_FREED_MEMORY = "GPTX_KEEP_FREED_MEMORY"  # 0: leave glibc's allocator as it is (see keep_freed_memory)


def keep_freed_memory_wanted() -> bool:
    """$GPTX_KEEP_FREED_MEMORY: unset or 1 applies keep_freed_memory on CPU, 0 does not (a machine
    short of memory, or a workload whose heap grows with it); anything else is an error."""
    raw = os.environ.get(KEEP_FREED_MEMORY, "1").strip()
    if raw not in ("0", "1"):
        raise GptxError(f"{KEEP_FREED_MEMORY}: expected 0 or 1, got {raw!r}")
    return raw == "1"


def keep_freed_memory(device: torch.device) -> bool:
    """On CPU, make freed tensor memory stay with the process for the next step (Linux, glibc).

    glibc serves every allocation above 32 MiB with a fresh mmap and unmaps it on free, so each
    step's large tensors come back as new pages the kernel must fault in and zero. With GPT-2's
    50,257-token vocabulary the logits and their gradients are ~200 MiB each at batch 8 x 128, so
    the kernel's share of the CPU time dominates. Serving every allocation from the heap and never
    trimming it (mallopt M_MMAP_MAX = 0, M_TRIM_THRESHOLD = max) keeps those pages, with
    bit-identical losses, for more peak RSS (memory freed in a step is kept for the next one);
    docs/performance.md has the measurements. Called once training is set up, after the data is
    loaded. Returns whether it applied.

    What it cannot promise: torch asks for 64-byte-aligned blocks, for which glibc 2.36 wants 96
    bytes more than a same-size block leaves free, so a process that frees and reallocates one lone
    large tensor of one size can grow its heap by that tensor every time (seen in one environment,
    not in another). Training and evaluation free many tensors together: their heaps stayed bounded
    in both environments (glibc trims free tops above 2 GiB).
    GPTX_KEEP_FREED_MEMORY=0 turns it off."""
    import ctypes
    import ctypes.util

    if device.type != "cpu" or not sys.platform.startswith("linux") or not keep_freed_memory_wanted():
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs: leave the allocator as it is
        return False
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # glibc's malloc.h
    return bool(mallopt(M_MMAP_MAX, 0)) and bool(mallopt(M_TRIM_THRESHOLD, 2**31 - 1))


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """``auto``: bfloat16 on a CUDA device that supports it, float32 elsewhere. On CPUs, even with
    native bf16 (AMX, AVX512-BF16), bf16 autocast measured no faster on the models gptx trains
    there: 0.73-0.84x fp32's tokens/s at 128 wide on AMX (autocast's casts cost more than the
    faster products save), +4 % on AVX512-BF16; ``training.dtype = "bfloat16"`` still asks for it."""
    if dtype != "auto":
        return dtype
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    return "float32"


def autocast_context(tc, device: torch.device):
    """bf16 autocast when ``training.dtype = "bfloat16"``, else nothing (reusable)."""
    return torch.autocast(device.type, dtype=torch.bfloat16) if tc.dtype == "bfloat16" else contextlib.nullcontext()


def allocating(fn):
    """``fn()``, with the allocator's refusal (an absurd size that got past the estimate) as one line."""
    try:
        return fn()
    except (MemoryError, torch.OutOfMemoryError) as err:
        raise GptxError(f"out of memory ({type(err).__name__}); lower training.batch_size or the model size") from None
    except RuntimeError as err:
        if "can't allocate memory" in str(err) or "out of memory" in str(err):
            raise GptxError("out of memory; lower training.batch_size or the model size") from None
        raise
