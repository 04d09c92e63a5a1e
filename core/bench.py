"""``gptx bench``: what this machine does, measured in one process run.

Sections (``--only``):

- ``peak``: practical matmul throughput, fp32 and bf16 (square GEMMs on the device the train
  section trains on, else the CPU, with the thread count the other sections use), the reference
  for model-FLOPs utilization; and memory bandwidth (reading a buffer far larger than the
  caches), the bound of batch-1 decoding, which reads every weight once per token.
- ``train``: tokens/s and MFU of the real training step (``gptx.training.step.TrainStep``: the same
  code ``gptx run`` executes) for an experiment file, over a fixed number of steps after warm-up.
  flops per token = 6N + 12·L·H·Q·T (``GPT.flops_per_token``), against the fp32 peak (the bf16
  peak when ``training.dtype = "bfloat16"``). Also the step's GEMM floor: the matrix products
  one step runs (recorded at the dispatcher), replayed alone with the same shapes and strides:
  the step time if everything else were free, so ``step / floor`` bounds any speed-up that
  does not make the products themselves faster.
- ``generate``: batch 1, a fixed prompt (32 tokens), greedy, a fixed number of new tokens (128,
  no early stop): tokens/s, time to first token and peak memory (RSS growth while loading and
  generating) for PyTorch with the KV cache (float, and ``torch-kv8``: the causal attention's int8
  cache on the same weights, with its cache bytes per token and layer against float32's; ``same``
  says how long its greedy tokens agree), onnxruntime fp32, int8 and int4 on a ``gptx.export`` of the
  same weights, and, when installed, Hugging Face ``generate`` on the same weights and
  onnxruntime-genai on the same export (the peers). Beside them: each exported precision's bound
  (``bounds``: the bytes a decode step reads, ``decode_step_bytes``, at the measured bandwidth)
  with each backend's share of it, and each export's perplexity on held-out text
  (``quality``: ``--quality-data``, scored by gptx eval's loop) against fp32 of the same weights;
  and ``web``: gptx web's page in headless
  Chromium on the fp32 export (``_WebRun``), at the same thread count, its own measured speed,
  and ``vs_ort_paired``, against the onnxruntime loop run alternately with it.
- ``busy`` (only with ``--only``): the train section's tokens/s quiet and beside ``--busy K``
  processes this section starts (each ``while True: pass``), with gptx's thread choice
  (``gptx.threads``) and with a fixed count (``--threads``, default every available CPU), and
  the ratios busy/quiet.
- ``speedrun`` (only with ``--only``): time to nanoGPT's quality, nanoGPT's recipe against
  ``speedrun_char.toml``, as whole processes (``gptx.speedrun``).
- ``startup`` (only with ``--only``): ``gptx run speedrun_char.toml`` as whole processes, tracked
  to a temporary MLflow store, ``--repeats`` times: the median of each run's own ``startup_s``
  (run.json: process start to the first step done), beside ``python -c "import torch"`` for scale.

Timings on a shared machine are noisy: compare ratios from one run, and look at ``machine.load``.
"""
from __future__ import annotations

import dataclasses
import gc
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Callable, Optional

from gptx.errors import GptxError
from gptx.export import GENAI_FILE

SECTIONS = ("peak", "train", "generate", "busy", "speedrun", "startup")  # the last three only when asked


@dataclasses.dataclass(frozen=True)
class Runtime:
    """What a generation backend is: the runtime (as the deploy table names it), the weights it
    decodes (``fp32``: PyTorch's or the fp32 export; ``int8``/``int4``: ``gptx export --quantize``),
    and whether it runs a gptx export (then it is compared with gptx's Python onnxruntime loop on
    the same export: ``vs_loop``)."""

    runtime: str
    precision: str = "fp32"
    onnx: bool = True


PYTHON_LOOP = "onnxruntime, Python loop"
# Every generation backend, in the order they are timed: the torch-based ones before any export
# work in this process (one gpt2 run measured HF at 2 tok/s after torch.onnx export, 18 without).
RUNTIMES = {
    "torch": Runtime("PyTorch (gptx generate)", onnx=False),
    "torch-kv8": Runtime("PyTorch, int8 KV cache", onnx=False),
    "hf": Runtime("transformers generate", onnx=False),
    "ort": Runtime(PYTHON_LOOP),
    "ort-int8": Runtime(PYTHON_LOOP, "int8"),
    "ort-int4": Runtime(PYTHON_LOOP, "int4"),
    "genai": Runtime("onnxruntime-genai"),
    "genai-int4": Runtime("onnxruntime-genai", "int4"),
    "node": Runtime("Node.js (onnxruntime-node)"),
    "web": Runtime("browser (onnxruntime-web, WebAssembly)"),
}
BACKENDS = tuple(RUNTIMES)
LOOP = {r.precision: name for name, r in RUNTIMES.items() if r.runtime == PYTHON_LOOP}  # precision -> its loop row
GENAI = tuple(name for name, r in RUNTIMES.items() if r.runtime == "onnxruntime-genai")
NODE_BENCH = Path(str(resources.files("gptx.export") / "node" / "bench.js"))  # the Node example's timing
MODEL_SIZES = {  # randomly initialised GPT-2-style models with GPT-2's BPE vocabulary
    "tiny": {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 1024},
    "gpt2": {"n_layer": 12, "n_head": 12, "n_embd": 768, "block_size": 1024},  # GPT-2 124M
}
def default_experiment() -> Path:
    """nanoGPT's Shakespeare recipe, as shipped in the package (found from any folder, wheel or checkout)."""
    from importlib import resources

    return Path(str(resources.files("gptx.experiments"))) / "shakespeare_char.toml"


# ---- the machine ---------------------------------------------------------------------------

def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> dict:
    import torch

    from gptx.training.machine import cpu_flags

    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": sorted(cpu_flags() & {"avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16",
                                           "amx_int8"}),  # what decides fp32/bf16/int8 speed
    }
    try:
        info["load"] = [round(x, 2) for x in os.getloadavg()]  # 1, 5, 15 minutes
    except OSError:
        info["load"] = None
    return info


# ---- memory --------------------------------------------------------------------------------

def _status_kib(field: str) -> Optional[int]:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


class PeakRss:
    """Peak resident memory growth over a block: resets the kernel's high-water mark
    (/proc/self/clear_refs, Linux) and reads VmHWM afterwards. ``mib`` is None where unsupported."""

    def __enter__(self):
        gc.collect()
        try:  # hand freed heap back to the OS first, or a reused free list hides the growth
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self.ok = False
        try:
            Path("/proc/self/clear_refs").write_text("5")
            self.ok = True
        except OSError:
            pass
        self.start = _status_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        peak = _status_kib("VmHWM")
        self.mib = round((peak - self.start) / 1024, 1) if self.ok and peak and self.start else None


# ---- peak ----------------------------------------------------------------------------------

def _timings(once: Callable[[], float], seconds: float, times: Optional[list] = None) -> list[float]:
    """``times`` plus the durations ``once()`` returns, repeated for about ``seconds`` (at least 3)."""
    times = list(times or [])
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(times) < 3:
        times.append(once())
    return times


def matmul_peak(dtype: str = "float32", seconds: float = 1.0, max_n: int = 2048, device: str = "cpu") -> dict:
    """Best GFLOP/s of an n x n @ n x n matmul. n doubles from 256 up to ``max_n`` while one
    product takes under a tenth of the budget (slow bf16 emulation stops early), then the product
    is repeated for about ``seconds``; the fastest repetition counts."""
    import torch

    dt = getattr(torch, dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def once(a, b) -> float:
        sync()
        t = time.perf_counter()
        torch.mm(a, b)
        sync()
        return time.perf_counter() - t

    n = 256
    while True:  # on a GPU, n = 2048 is launch-bound: give it room (max_n 16384: 0.5 GiB of bf16 operands)
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        once(a, b)  # first touch / kernel selection
        t = once(a, b)
        if t > seconds / 10 or n >= max_n:
            break
        n *= 2
    times = _timings(lambda: once(a, b), seconds, [t])
    best = min(times)
    return {"dtype": dtype, "n": n, "gflops": round(2 * n ** 3 / best / 1e9, 1), "repeats": len(times),
            "device": torch.device(device).type}


def train_device(experiment, overrides: tuple) -> str:
    """The device the train section will train on (``training.device``; auto: CUDA when present)."""
    from gptx.config import load_experiment
    from gptx.training.machine import pick_device

    return str(pick_device(load_experiment(experiment or default_experiment(), list(overrides)).training))


def memory_bandwidth(seconds: float = 1.0, mib: int = 512) -> dict:
    """Best GB/s of summing a ``mib`` MiB fp32 buffer (read once per pass; far beyond any cache)."""
    import torch

    x = torch.ones(mib * 2**20 // 4)
    x.sum()

    def once() -> float:
        t = time.perf_counter()
        x.sum()
        return time.perf_counter() - t

    times = _timings(once, seconds)
    return {"mib": mib, "gbps": round(x.numel() * 4 / min(times) / 1e9, 1), "repeats": len(times)}


# ---- training ------------------------------------------------------------------------------

GEMM_OPS = ("mm", "addmm", "bmm", "baddbmm")


def gemm_floor(run_step: Callable[[], object], device, repeats: int = 5) -> dict:
    """Record the matrix products of one ``run_step()`` at the dispatcher (forward, backward and
    optimizer alike), then replay them alone on fresh tensors of the same shapes and strides:
    the best time of the replay is the step's floor. Products inside fused kernels (attention)
    are not GEMM calls and count as the rest of the step."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    ops = {getattr(torch.ops.aten, name).default for name in GEMM_OPS}
    calls: list = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in ops:
                calls.append((func, [(a.shape, a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a for a in args],
                              dict(kwargs or {})))
            return func(*args, **(kwargs or {}))

    with Record():
        run_step()

    def tensor(shape, stride, dtype):  # [shape] with these strides (0 strides: broadcast views)
        size = 1 + sum((n - 1) * st for n, st in zip(shape, stride) if n > 0)
        return torch.randn(size, device=device).to(dtype).as_strided(shape, stride)

    replay = [(func, [tensor(*a) if isinstance(a, tuple) else a for a in args], kw) for func, args, kw in calls]
    flops = 0
    for func, args, _ in replay:
        a, b = (args[1], args[2]) if func in (torch.ops.aten.addmm.default, torch.ops.aten.baddbmm.default) else args[:2]
        flops += 2 * a.shape[:-1].numel() * a.shape[-1] * b.shape[-1]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(repeats + 1):  # the first pass warms up
        sync()
        t = time.perf_counter()
        for func, args, kw in replay:
            func(*args, **kw)
        sync()
        best = min(best, time.perf_counter() - t)
    return {"gemms": len(replay), "gflop": round(flops / 1e9, 6), "ms": round(best * 1e3, 2),
            "gflops": round(flops / best / 1e9, 1) if replay else None}


def _minor_faults() -> Optional[int]:
    """This process's minor page faults so far (None where getrusage is not available)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def bench_train(experiment=None, overrides: tuple = (), steps: int = 50, warmup: int = 5,
                peak: Optional[dict] = None, threads: Optional[int] = None) -> dict:
    """Time ``steps`` optimizer steps of the experiment's real training step after ``warmup``
    (which includes torch.compile when ``training.compile``). Nothing is written: no run
    directory, no MLflow run, no checkpoint."""
    import torch

    from gptx.config import load_experiment
    from gptx.distributed import Dist
    from gptx.model import GPT
    from gptx.training.machine import keep_freed_memory
    from gptx.training.plan import plan_run
    from gptx.training.step import BatchSplit, build_optimizer, build_schedule, set_lr, TrainStep

    from gptx.threads import ThreadGovernor

    experiment = experiment or default_experiment()
    plan = plan_run(load_experiment(experiment, list(overrides)), outputs=False)
    cfg, tc, device, dataset = plan.cfg, plan.cfg.training, plan.device, plan.dataset
    governor = ThreadGovernor(threads or tc.threads)  # as gptx run chooses its threads
    torch.manual_seed(tc.seed)
    model = GPT(cfg.model).to(device)
    model.train()
    train_model = torch.compile(model) if tc.compile else model
    optimizer, schedule = build_optimizer(cfg, model, device), build_schedule(cfg)
    step = TrainStep(train_model, optimizer, tc, Dist(), device, BatchSplit.plan(tc))
    keep_freed_memory(device)  # as gptx run does
    governor.first_reading()
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    tokens_per_step = tc.grad_accum_steps * tc.batch_size * cfg.model.block_size

    def one(i: int) -> float:
        set_lr(optimizer, schedule.factor(i))
        x, y = dataset.batch(tc.grad_accum_steps * tc.batch_size)
        loss = float(step(x, y)[0])  # float(): the step is complete (synchronised)
        governor.tick()
        return loss

    t0 = time.perf_counter()
    first_loss = None
    for i in range(warmup):
        loss = one(i)
        first_loss = loss if first_loss is None else first_loss
    sync()
    warmup_s = time.perf_counter() - t0
    times, loss = [], first_loss
    faults = _minor_faults()
    for i in range(warmup, warmup + steps):
        t = time.perf_counter()
        loss = one(i)
        sync()
        times.append(time.perf_counter() - t)
    faults = None if faults is None else round((_minor_faults() - faults) / steps)
    median = statistics.median(times)
    floor = gemm_floor(lambda: one(warmup + steps), device)
    flops_per_token = model.flops_per_token(cfg.model.block_size)
    tok_s = tokens_per_step / median
    out = {
        "experiment": str(Path(experiment)),
        "device": str(device),
        "dtype": tc.dtype,
        "compile": tc.compile,
        "parameters": model.num_params(),
        "tokens_per_step": tokens_per_step,
        "warmup_steps": warmup,
        "steps": steps,
        "warmup_s": round(warmup_s, 2),
        "step_ms_median": round(median * 1e3, 2),
        "step_ms_min": round(min(times) * 1e3, 2),
        "tokens_per_s": round(tok_s, 1),
        "tokens_per_s_best": round(tokens_per_step / min(times), 1),
        "threads": governor.threads,  # at the end; threads_changed: (seconds, threads) as the load moved
        "threads_changed": governor.changes,
        "flops_per_token": flops_per_token,
        "model_gflops": round(flops_per_token * tok_s / 1e9, 2),
        "minor_page_faults_per_step": faults,  # pages the kernel had to map in again (see keep_freed_memory)
        "loss_first": round(first_loss, 4) if first_loss is not None else None,
        "loss_last": round(loss, 4) if loss is not None else None,
        "mfu": None,
        "mfu_peak": None,
        "gemm_floor": floor | {"share_of_step": round(floor["ms"] / (median * 1e3), 3),
                               "max_speedup": round(median * 1e3 / floor["ms"], 2) if floor["ms"] else None},
    }
    ref = (peak or {}).get("bfloat16" if tc.dtype == "bfloat16" else "float32")
    if ref and ref.get("device", "cpu") == device.type:  # a peak measured on the device that trained
        out["mfu"] = round(flops_per_token * tok_s / (ref["gflops"] * 1e9), 4)
        out["mfu_peak"] = ref["dtype"]
    return out


# ---- a busy machine -------------------------------------------------------------------------

class BusyLoad:
    """``k`` processes that each keep one CPU busy (``while True: pass``), for as long as the
    ``with`` block runs: the neighbours a laptop, a shared server or a CI machine has."""

    def __init__(self, k: int):
        self.k, self.procs = k, []

    def __enter__(self) -> "BusyLoad":
        import subprocess
        import sys

        for _ in range(self.k):
            self.procs.append(subprocess.Popen([sys.executable, "-c", "while True: pass"]))
        time.sleep(0.5)  # let the scheduler see them before the first thread decision
        return self

    def __exit__(self, *exc) -> None:
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()


def bench_busy(experiment=None, overrides: tuple = (), steps: int = 50, warmup: int = 5, busy: int = 1,
               threads: Optional[int] = None) -> dict:
    """Training tokens/s quiet and beside ``busy`` busy processes, for gptx's thread choice
    (``gptx.threads``) and for a fixed count (``threads``, default: every available CPU, torch's
    own default): the ratio busy/quiet says how gracefully training shares the machine."""
    from gptx.threads import available_cpus

    fixed = threads or available_cpus()
    out: dict = {"busy_processes": busy, "available_cpus": available_cpus(), "fixed_threads": fixed}
    runs = {}
    for load in (0, busy):  # quiet first, then the same runs beside the load
        for mode, pinned in (("auto", None), ("fixed", fixed)):
            with BusyLoad(load):
                r = bench_train(experiment, overrides, steps, warmup, threads=pinned)
            runs[(mode, load)] = r
    for mode in ("auto", "fixed"):
        quiet, loaded = runs[(mode, 0)], runs[(mode, busy)]
        out[mode] = {"quiet_tokens_per_s": quiet["tokens_per_s"], "busy_tokens_per_s": loaded["tokens_per_s"],
                     "ratio": round(loaded["tokens_per_s"] / quiet["tokens_per_s"], 3),
                     "quiet_threads": quiet["threads"], "busy_threads": loaded["threads"],
                     "busy_threads_changed": loaded["threads_changed"]}
    out["auto_vs_fixed_quiet"] = round(out["auto"]["quiet_tokens_per_s"] / out["fixed"]["quiet_tokens_per_s"], 3)
    out["auto_vs_fixed_busy"] = round(out["auto"]["busy_tokens_per_s"] / out["fixed"]["busy_tokens_per_s"], 3)
    return out


def busy_table(b: dict) -> str:
    lines = [f"training beside {b['busy_processes']} busy process(es), {b['available_cpus']} CPUs available:",
             f"  {'threads':<22} {'quiet tok/s':>12} {'busy tok/s':>12} {'busy/quiet':>11}"]
    for mode, label in (("auto", "gptx's choice"), ("fixed", f"fixed {b['fixed_threads']}")):
        r = b[mode]
        lines.append(f"  {label + ' (' + str(r['quiet_threads']) + ' -> ' + str(r['busy_threads']) + ')':<22} "
                     f"{r['quiet_tokens_per_s']:>12,.0f} {r['busy_tokens_per_s']:>12,.0f} {r['ratio']:>11.3f}")
    lines.append(f"  gptx's choice vs fixed: {b['auto_vs_fixed_quiet']:.3f}x quiet, {b['auto_vs_fixed_busy']:.3f}x busy")
    return "\n".join(lines)


# ---- generation ----------------------------------------------------------------------------

def _synthetic_config(size: str):
    """The experiment config of ``--model size``: MODEL_SIZES with GPT-2's tokenizer."""
    from gptx.config import from_dict

    if size not in MODEL_SIZES:
        raise GptxError(f"--model: unknown size {size!r}; choose from {', '.join(MODEL_SIZES)}")
    return from_dict({"model": dict(MODEL_SIZES[size]), "tokenizer": {"kind": "gpt2"}, "tracking": {"enabled": False}})


def _synthetic_checkpoint(size: str, work: Path, seed: int = 0) -> Path:
    """A randomly initialised GPT-2-style model of ``size`` with GPT-2's tokenizer, saved as a
    gptx checkpoint under ``work``."""
    import torch

    from gptx import checkpoint as ckpt
    from gptx.model import GPT

    cfg = _synthetic_config(size)
    tokenizer = ckpt.build_tokenizer(cfg.tokenizer)
    cfg.model.vocab_size = tokenizer.vocab_size
    torch.manual_seed(seed)
    model = GPT(cfg.model).eval()
    return ckpt.save(work / f"random-{size}", 0, model, cfg, tokenizer)


def _is_plain_gpt2(config) -> bool:
    from gptx.config import ModelConfig

    m: ModelConfig = config.model
    return (m.attention.name == "causal" and m.positional.name == "learned" and m.ffn.name == "gelu"
            and getattr(m.ffn.options, "approximate", "tanh") == "tanh" and m.ffn.options.hidden in (None, 4 * m.n_embd)
            and m.norm.name == "layernorm" and m.block.name == "sequential" and m.block.options.placement == "pre" and m.bias and m.tie_embeddings
            and m.norm.options.bias and m.attention.options.n_kv_heads in (None, m.n_head)
            and m.attention.options.window is None)


class _Backend:
    """One way to generate: ``load()`` returns a callable ``run(prompt, new_tokens) -> ids``."""

    def __init__(self, name: str, load: Callable[[], Callable[[list[int], int], list[int]]]):
        self.name, self.load = name, load


def _time_backend(backend: _Backend, prompt: list[int], new_tokens: int, repeats: int) -> dict:
    """Load, warm up, then time first-token latency (a 1-token generation: prefill + one sample)
    and full generations of ``new_tokens``; peak RSS growth covers loading and the first run."""
    with PeakRss() as mem:
        t = time.perf_counter()
        run = backend.load()
        load_s = time.perf_counter() - t
        ids = run(prompt, new_tokens)  # warm-up (also the tokens compared across backends)
    ttft = []
    for _ in range(max(3, repeats)):
        t = time.perf_counter()
        run(prompt, 1)
        ttft.append(time.perf_counter() - t)
    total = []
    for _ in range(repeats):
        t = time.perf_counter()
        got = run(prompt, new_tokens)
        total.append(time.perf_counter() - t)
    assert len(got) == new_tokens, f"{backend.name} generated {len(got)} tokens, not {new_tokens}"
    return _row(new_tokens, statistics.median(ttft), statistics.median(total), load_s, mem.mib, ids)


def _row(new_tokens: int, first: float, whole: float, load_s: float, peak_rss_mib, ids: list[int]) -> dict:
    """A backend's row from its median first-token and whole-generation seconds."""
    return {
        "tokens_per_s": round(new_tokens / whole, 1),
        "decode_tokens_per_s": round((new_tokens - 1) / (whole - first), 1) if new_tokens > 1 and whole > first else None,
        "ttft_ms": round(first * 1e3, 2),
        "total_s": round(whole, 3),
        "load_s": round(load_s, 2),
        "peak_rss_mib": peak_rss_mib,
        "ids": ids,
    }


class _GenerateBench:
    """The weights under test and the ways to decode them. Each ``load_<backend>`` returns a
    callable ``run(prompt, new_tokens) -> ids``; exports are made once, on first use."""

    def __init__(self, source: Path, cfg, work: Path, prompt: list[int], threads: int, info: dict, log):
        self.source, self.cfg, self.work, self.prompt = source, cfg, work, prompt
        self.threads, self.info, self.log = threads, info, log
        self.onnx_dirs: dict[str, Path] = {}
        from gptx.threads import spinning_pays

        self.spin = spinning_pays(threads)  # genai and Node get what gptx's own sessions choose (make_session)

    def skip_reason(self, name: str) -> Optional[str]:
        """Why a backend cannot run on this model and machine, or None."""
        from importlib.util import find_spec

        if name == "hf":
            if find_spec("transformers") is None:
                return "transformers is not installed"
            if not _is_plain_gpt2(self.cfg):
                return "the model is not plain GPT-2 (HF GPT2LMHeadModel cannot hold it)"
        if name in GENAI and find_spec("onnxruntime_genai") is None:
            return "onnxruntime-genai is not installed"
        if name == "node" and shutil.which("node") is None:
            return "Node.js (node) is not installed"
        if RUNTIMES[name].onnx:
            from gptx.export.onnx_export import check_exportable

            try:
                check_exportable(self.cfg.model)
            except GptxError as err:
                return str(err)
        if name in GENAI and self.cfg.tokenizer.name != "gpt2":
            return "onnxruntime-genai needs tokenizer.json (GPT-2 BPE exports only)"
        if name in GENAI and not (self.export(RUNTIMES[name].precision) / GENAI_FILE).is_file():
            return "onnxruntime-genai reads float32 key/value caches only; this model declares another cache"
        if name == "node":
            return self.node_skip_reason()
        if name == "torch-kv8" and self.cfg.model.attention.name != "causal":
            return f"the int8 KV cache is the causal attention's kv_cache option; this model's attention is '{self.cfg.model.attention.name}'"
        if name == "web":
            from gptx.export.browser import unavailable

            return unavailable()
        return None

    def time_web(self, new_tokens: int, repeats: int) -> dict:
        """The page on the fp32 export at this bench's threads, timed by ``_WebRun``."""
        out = self.export("fp32")  # export time is not generation time
        return _WebRun(out, self.threads, self.prompt, new_tokens, self.load_ort("fp32")).measure(repeats)

    def time(self, name: str, new_tokens: int, repeats: int) -> dict:
        """``name``'s row: the page (``_WebRun``) and Node (bench.js) time themselves; every other
        backend is loaded and timed here (``_time_backend``)."""
        if name == "web":
            return self.time_web(new_tokens, repeats)
        if name == "node":
            return self.time_node(new_tokens, repeats)
        return _time_backend(_Backend(name, self.loader(name)), self.prompt, new_tokens, repeats)

    def loader(self, name: str) -> Callable[[], Callable[[list[int], int], list[int]]]:
        scheme = RUNTIMES[name].precision
        if name in LOOP.values():
            self.export(scheme)  # export time is not generation time
            return lambda: self.load_ort(scheme)
        if name in GENAI:
            self.export(scheme)
            return lambda: self.load_genai(scheme)
        return getattr(self, f"load_{name.replace('-', '_')}")

    def export(self, scheme: str) -> Path:
        if scheme in self.onnx_dirs:
            return self.onnx_dirs[scheme]
        from gptx.export.onnx_export import export_checkpoint

        if "fp32" not in self.onnx_dirs:
            self.log("exporting to ONNX (verified against PyTorch)...")
            t = time.perf_counter()
            export_checkpoint(self.source, self.work / "onnx-fp32", log=lambda s: None, track=False)
            self.info["export_s"] = round(time.perf_counter() - t, 1)
            self.onnx_dirs["fp32"] = self.work / "onnx-fp32"
        if scheme != "fp32":
            from gptx.export import MODEL_FILE
            from gptx.export.quantize import quantize

            self.log(f"quantizing to {scheme}...")
            out = self.work / f"onnx-{scheme}"
            shutil.copytree(self.onnx_dirs["fp32"], out)
            quantize(scheme, self.onnx_dirs["fp32"] / MODEL_FILE, out / MODEL_FILE, self.work)
            self.onnx_dirs[scheme] = out
        return self.onnx_dirs[scheme]

    def load_torch(self):
        from gptx import checkpoint as ckpt
        from gptx.generate import decoding_layout, generate_ids
        from gptx.sampling import Sampler

        m = decoding_layout(ckpt.load(self.source).model.eval())
        return lambda p, n: generate_ids(m, [p], n, Sampler(temperature=0), None).ids[0]

    def load_torch_kv8(self):
        """PyTorch decoding of the same weights with the causal attention's int8 KV cache; records
        the cache's bytes per token and layer against float32's."""
        from gptx import checkpoint as ckpt
        from gptx.generate import decoding_layout, generate_ids
        from gptx.plugins.attention import with_kv_cache
        from gptx.sampling import Sampler

        model = ckpt.load(self.source).model.float()
        m = decoding_layout(with_kv_cache(model, "int8"))
        float32, int8 = (with_kv_cache(model, "float").cache_bytes_per_token(), m.cache_bytes_per_token())
        layers = model.config.n_layer
        self.info["kv_cache"] = {"float32_bytes_per_token_per_layer": float32 // layers,
                                 "int8_bytes_per_token_per_layer": int8 // layers, "saving": round(float32 / int8, 2)}
        del model
        return lambda p, n: generate_ids(m, [p], n, Sampler(temperature=0), None).ids[0]

    def load_ort(self, scheme: str):
        from gptx.export.runtime import OnnxGenerator
        from gptx.sampling import Sampler

        gen = OnnxGenerator(self.export(scheme), threads=self.threads)
        return lambda p, n: gen.generate([p], n, Sampler(temperature=0), eot_id=None).ids[0]

    def load_hf(self):
        import torch
        import transformers

        from gptx import checkpoint as ckpt
        from gptx.hf import to_hf_state_dict

        m = self.cfg.model
        config = transformers.GPT2Config(
            vocab_size=m.vocab_size, n_positions=m.block_size, n_embd=m.n_embd, n_layer=m.n_layer, n_head=m.n_head,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=m.norm.options.eps, tie_word_embeddings=True,
        )
        hf = transformers.GPT2LMHeadModel(config).eval()
        weights = ckpt.load(self.source).model
        missing, unexpected = hf.load_state_dict(to_hf_state_dict(weights), strict=False)
        missing = [k for k in missing if not k.endswith(".attn.bias") and not k.endswith(".masked_bias")]
        if missing or unexpected:
            raise GptxError(f"HF GPT-2: weights did not map (missing {missing[:3]}, unexpected {unexpected[:3]})")
        hf.tie_weights()
        with torch.no_grad():
            x = torch.tensor([self.prompt])
            self.info["hf_logits_max_abs_diff"] = float((hf(x).logits - weights(x)[0]).abs().max())
        del weights

        def run(p, n):
            with torch.no_grad():
                out = hf.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long),
                                  max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            return out[0, len(p):].tolist()
        return run

    def load_genai(self, scheme: str = "fp32"):
        """onnxruntime-genai on the ``scheme`` export with its genai_config.json as written, but for
        the thread count and spinning: gptx's own sessions' (``make_session``), as every other backend's."""
        import onnxruntime_genai as og

        config = og.Config(str(self.export(scheme)))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": self.threads, "session.intra_op.allow_spinning": "1" if self.spin else "0"}}}}))
        og_model = og.Model(config)

        def run(p, n):
            params = og.GeneratorParams(og_model)
            params.set_search_options(do_sample=False, max_length=len(p) + n, min_length=len(p) + n, batch_size=1)
            gen = og.Generator(og_model, params)
            gen.append_tokens(p)
            got = []
            while not gen.is_done() and len(got) < n:
                gen.generate_next_token()
                got.append(int(gen.get_next_tokens()[0]))
            return got
        return run

    def node_skip_reason(self) -> Optional[str]:
        """Why the Node example cannot run the fp32 export here (its packages resolve as Node
        resolves them: beside the script, or NODE_PATH), or None."""
        import subprocess

        from gptx.export import TOKENIZER_FILE

        try:
            r = subprocess.run(["node", str(NODE_BENCH), "--check"], capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            return "node did not load the Node example's packages in 2 minutes"
        if r.returncode != 0:
            said = r.stderr.strip().splitlines()
            return said[-1].removeprefix("Error: ") if said else f"node exited {r.returncode}"
        if not (self.export("fp32") / TOKENIZER_FILE).is_file():  # after the cheap check: this exports
            return f"the export has no {TOKENIZER_FILE}, which the Node example reads"
        return None

    def time_node(self, new_tokens: int, repeats: int) -> dict:
        """The Node example on the fp32 export, timed inside Node (export/node/bench.js: the same
        warm-up, first-token and whole-generation runs as ``_time_backend``, with this bench's
        threads); the same keys as ``_time_backend``."""
        import subprocess

        args = ["node", str(NODE_BENCH), str(self.export("fp32")), "--ids", ",".join(map(str, self.prompt)),
                "--new-tokens", str(new_tokens), "--repeats", str(repeats), "--threads", str(self.threads)]
        if self.spin:
            args.append("--spin")
        r = subprocess.run(args, capture_output=True, text=True, timeout=3600)
        if r.returncode != 0:
            said = r.stderr.strip().splitlines()
            raise GptxError(f"node bench.js failed: {said[-1] if said else f'exit {r.returncode}'}")
        got = json.loads(r.stdout.strip().splitlines()[-1])
        return _row(new_tokens, statistics.median(got["ttft_ms"]) / 1e3, statistics.median(got["total_ms"]) / 1e3,
                    got["load_ms"] / 1e3, round(got["peak_rss_growth_mib"], 1), got["ids"])


# ---- the bound of each precision -----------------------------------------------------------

GATHERS = {"Gather": "axis", "GatherBlockQuantized": "gather_axis"}  # op -> its attribute naming the gathered axis
_NIBBLE_TYPES = {"INT4", "UINT4", "FLOAT4E2M1"}


def decode_step_bytes(model_path: Path) -> int:
    """Bytes of initializers one batch-1 decode step of ``model_path`` reads, each at its stored
    dtype (4-bit types count half a byte; packed uint8 blobs, scales and zero points as stored).
    An initializer read by any other op counts whole (the LM head, every MatMul); one only ever
    gathered (the token and position tables) counts one slice of its gathered axis per Gather:
    one token per step reads one row. Each initializer counts once, however many nodes read it.
    The key/value cache is not counted: it grows with the position, the weights do not."""
    import onnx

    graph = onnx.load(str(model_path), load_external_data=False).graph  # shapes and dtypes only
    inits = {t.name: t for t in graph.initializer}
    whole: set[str] = set()
    rows: dict[str, int] = {}  # initializer -> bytes one step gathers from it
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            if node.op_type in GATHERS and k != 1:  # input 1 is the indices
                t = inits[name]
                axis = next((a.i for a in node.attribute if a.name == GATHERS[node.op_type]), 0) % max(1, len(t.dims))
                rows[name] = rows.get(name, 0) + _tensor_bytes(t) // max(1, t.dims[axis] if t.dims else 1)
            else:
                whole.add(name)
    return sum(_tensor_bytes(inits[n]) for n in whole) + sum(b for n, b in rows.items() if n not in whole)


def _tensor_bytes(t) -> int:
    import numpy as np
    import onnx

    count = int(np.prod(t.dims, dtype=np.int64)) if t.dims else 1
    if onnx.TensorProto.DataType.Name(t.data_type) in _NIBBLE_TYPES:
        return (count + 1) // 2
    return count * np.dtype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize


def bounds(onnx_dirs: dict, bandwidth: Optional[dict]) -> dict:
    """Per precision exported (fp32, int8, int4): the bytes a decode step reads and the tokens/s
    that bounds at the measured bandwidth (batch-1 decoding streams its weights once per token)."""
    from gptx.export import MODEL_FILE

    out = {}
    for scheme, directory in onnx_dirs.items():
        read = decode_step_bytes(Path(directory) / MODEL_FILE)
        out[scheme] = {"bytes_per_token": read, "mib_per_token": round(read / 2**20, 1),
                       "bound_tok_s": round(bandwidth["gbps"] * 1e9 / read, 1) if bandwidth else None}
    return out


def _share_of_bound(results: dict, precision_bounds: dict) -> None:
    """Each backend's decode tokens/s (after the first token: what the bound is about) against its
    precision's bound."""
    for name, r in results.items():
        bound = precision_bounds.get(RUNTIMES[name].precision, {}).get("bound_tok_s")
        rate = r.get("decode_tokens_per_s") or r["tokens_per_s"]
        r["bound_tok_s"] = bound
        r["share_of_bound"] = round(rate / bound, 3) if bound else None


# ---- quality beside speed ------------------------------------------------------------------

QUALITY_BYTES = 16_384  # the shipped Shakespeare's tail: held out by every shipped recipe (val_fraction 0.1)
RANDOM_WEIGHTS_NOTE = ("random-init weights: every precision's perplexity is near the vocabulary size and its change "
                       "says nothing; give --checkpoint a trained model")


def check_quality_data(path: Optional[str], checkpoint_dir: Optional[str] = None, model: str = "tiny") -> None:
    """--quality-data: a non-empty regular file of text that the model's tokenizer makes at least
    2 tokens of, checked before the machine is measured, not minutes later when the exports are
    scored (``text_ids`` caches the tokens: scoring reads them back)."""
    if path is None:
        return
    from gptx import checkpoint as ckpt
    from gptx.evaluate import text_ids

    p = Path(path)
    if not p.exists():
        raise GptxError(f"--quality-data: {path}: no such file")
    if not p.is_file():
        raise GptxError(f"--quality-data: {path}: not a regular file")
    if p.stat().st_size == 0:
        raise GptxError(f"--quality-data: {path}: is empty (a held-out text is needed to score)")
    if checkpoint_dir is None:
        tokenizer = ckpt.build_tokenizer(_synthetic_config(model).tokenizer)
    else:
        tokenizer = ckpt.read_with_tokenizer(ckpt.resolve(checkpoint_dir))[2]
    try:
        text_ids(p, tokenizer)
    except GptxError as err:  # its lines name gptx eval's option
        raise GptxError("--quality-data: " + str(err).removeprefix("--data: ")) from None


def quality_text(path: Optional[str], work: Path) -> Path:
    """``path``, or the last QUALITY_BYTES of the shipped Shakespeare written under ``work``."""
    if path is not None:
        return Path(path)
    shipped = default_experiment().parent / "data" / "tinyshakespeare.txt"
    tail = shipped.read_bytes()[-QUALITY_BYTES:]
    start = tail.find(b"\n") + 1  # from a line start: no cut character or word
    out = work / "quality.txt"
    out.write_bytes(tail[start:])
    return out


def bench_quality(onnx_dirs: dict, text: Path, random_weights: bool, log=lambda s: None) -> dict:
    """Perplexity of each exported precision on ``text`` (gptx eval's own loop on the export) and
    each quantized one's change against fp32 of the same weights."""
    from gptx.evaluate import OnnxScorer, evaluate_text

    out: dict = {"data": str(text), "random_weights": random_weights}
    fp32 = None
    if random_weights:
        out["note"] = RANDOM_WEIGHTS_NOTE
    for scheme, directory in onnx_dirs.items():  # fp32 first: the export makes it before any quantization
        log(f"scoring {scheme} on {text.name}...")
        try:
            r = evaluate_text(OnnxScorer(Path(directory)), text)
        except GptxError as err:  # its lines name gptx eval's option
            raise GptxError("--quality-data: " + str(err).removeprefix("--data: ")) from None
        out["tokens"] = r["tokens"]
        out[scheme] = {"loss": round(r["loss"], 5), "perplexity": round(r["perplexity"], 4)}
        fp32 = r["perplexity"] if scheme == "fp32" else fp32
        if scheme != "fp32" and fp32:
            out[scheme]["vs_fp32_pct"] = round((r["perplexity"] / fp32 - 1) * 100, 3)
    return out


def _model_info(source: Path, name: str, prompt_tokens: int, new_tokens: int, threads: int, repeats: int,
                bandwidth: Optional[dict]):
    """The model's config and the figures that describe it (the weights are loaded and let go)."""
    from gptx import checkpoint as ckpt

    ck = ckpt.load(source)
    m, params = ck.config.model, ck.model.num_params()
    if prompt_tokens + new_tokens > m.block_size:
        raise GptxError(f"--prompt-tokens + --new-tokens = {prompt_tokens + new_tokens} exceeds the model's "
                        f"context of {m.block_size}")
    info = {"model": name, "parameters": params, "n_layer": m.n_layer, "n_embd": m.n_embd, "vocab_size": m.vocab_size,
            "prompt_tokens": prompt_tokens, "new_tokens": new_tokens, "batch": 1, "threads": threads,
            "repeats": repeats,
            # batch-1 decoding reads every weight once per token: fp32 bytes / bandwidth bounds it
            "fp32_weights_mib": round(params * 4 / 2**20, 1)}
    if bandwidth:
        info["fp32_bandwidth_bound_tok_s"] = round(bandwidth["gbps"] * 1e9 / (params * 4), 1)
    return ck.config, info


def _compare_backends(results: dict) -> None:
    """Each backend's first token that differs from PyTorch's, and its speed against HF and genai."""
    ref = results.get("torch", {}).get("ids")
    for r in results.values():
        ids = r.pop("ids")
        r["same_tokens_as_torch"] = None if ref is None else next((i for i, (a, b) in enumerate(zip(ids, ref)) if a != b), len(ids))
    hf = results.get("hf", {}).get("tokens_per_s")
    genai = results.get("genai", {}).get("tokens_per_s")
    for r in results.values():
        r["vs_hf"] = round(r["tokens_per_s"] / hf, 2) if hf else None
        r["vs_genai"] = round(r["tokens_per_s"] / genai, 2) if genai else None


def _compare_to_loop(results: dict) -> None:
    """Each runtime that decodes an export on its own (genai, Node, the browser) against gptx's
    Python loop on the same export and thread count: ``loop`` names that row, ``vs_loop`` is
    tokens/s over its tokens/s."""
    for name, r in results.items():
        loop = LOOP[RUNTIMES[name].precision]
        if RUNTIMES[name].onnx and name != loop:
            ref = results.get(loop, {}).get("tokens_per_s")
            r["loop"] = loop
            r["vs_loop"] = round(r["tokens_per_s"] / ref, 2) if ref else None


class _WebRun:
    """gptx web's page (``gptx.export.browser.ServedPage``) generating from the export ``out`` with
    ``threads`` WebAssembly threads: greedy, exactly ``new_tokens`` after the prompt ids, as every
    backend. Speeds are the page's own (performance.now() around its generation, in its stats).

    V8 first runs WebAssembly with its baseline compiler and optimizes the hot functions in the
    background as they run: the page's first generations are slower than the later ones. So the
    first generation is reported apart (``first_tokens_per_s``: what a visitor's first click
    gets), then warm-up generations run until one is within ``SETTLED`` of the one before (two
    at least, ``MAX_WARMUP`` at most). Each timed generation then alternates with one of
    ``ort_run`` (the onnxruntime loop on the same export and threads): ``vs_ort_paired`` is the
    median of their ratios, which a neighbour's load drifting during the run shifts far less
    than two rows timed minutes apart."""

    SETTLED = 0.1
    MAX_WARMUP = 6

    def __init__(self, out: Path, threads: int, prompt: list[int], new_tokens: int, ort_run):
        self.out, self.threads, self.prompt, self.new_tokens, self.ort_run = out, threads, prompt, new_tokens, ort_run

    def measure(self, repeats: int) -> dict:
        from gptx.export.browser import ServedPage

        with ServedPage(self.out, self.threads) as page:
            first = page.generate(self.prompt, self.new_tokens)
            warmup = self.warm_up(page)
            timed, ratios = [], []
            for _ in range(repeats):
                ort_tok_s = self.time_ort()
                timed.append(page.generate(self.prompt, self.new_tokens)["stats"])
                ratios.append(timed[-1]["tokens_per_s"] / ort_tok_s)
        return self.row(first, timed, warmup, ratios)

    def warm_up(self, page) -> int:
        """Generations until one's tokens/s is within SETTLED of the one before (two at least: the
        first one's optimizing is still under way); how many ran."""
        previous = page.generate(self.prompt, self.new_tokens)["stats"]["tokens_per_s"]
        for n in range(2, self.MAX_WARMUP + 1):
            now = page.generate(self.prompt, self.new_tokens)["stats"]["tokens_per_s"]
            if abs(now - previous) <= self.SETTLED * previous:
                return n
            previous = now
        return self.MAX_WARMUP

    def time_ort(self) -> float:
        t = time.perf_counter()
        self.ort_run(self.prompt, self.new_tokens)
        return self.new_tokens / (time.perf_counter() - t)

    def row(self, first: dict, timed: list[dict], warmup: int, ratios: list[float]) -> dict:
        stats = first["stats"]
        median = lambda key: statistics.median(s[key] for s in timed)  # noqa: E731
        decode = [s["decode_tokens_per_s"] for s in timed if s["decode_tokens_per_s"] is not None]
        tok_s = median("tokens_per_s")
        return {
            "tokens_per_s": round(tok_s, 1),
            "decode_tokens_per_s": round(statistics.median(decode), 1) if decode else None,
            "ttft_ms": round(median("ttft_ms"), 2),
            "total_s": round(self.new_tokens / tok_s, 3),
            "load_s": round(stats["load_ms"] / 1e3, 2),  # the page's: downloading the model, starting onnxruntime-web
            "peak_rss_mib": None,  # the browser's memory is in its own processes, not this one's
            "ids": first["result"]["ids"],
            "first_tokens_per_s": stats["tokens_per_s"],
            "warmup_runs": warmup,
            "vs_ort_paired": round(statistics.median(ratios), 2),
            # what decides the page's speed, as it reports it: WebAssembly or WebGPU, threads (which need
            # cross-origin isolation), onnxruntime-web in a worker (proxy) or on the page's thread
            "page": {k: stats.get(k) for k in ("backend", "threads", "cross_origin_isolated", "proxy")},
        }


def bench_generate(model: str = "tiny", checkpoint_dir: Optional[str] = None, backends=BACKENDS,
                   prompt_tokens: int = 32, new_tokens: int = 128, repeats: int = 3,
                   log: Callable[[str], None] = lambda s: None, bandwidth: Optional[dict] = None,
                   quality_data: Optional[str] = None) -> dict:
    import numpy as np
    import torch

    threads = torch.get_num_threads()  # --backends was checked by check_inputs
    work = Path(tempfile.mkdtemp(prefix="gptx-bench-"))
    results: dict = {}
    skipped: dict = {}
    try:
        source = Path(checkpoint_dir) if checkpoint_dir else _synthetic_checkpoint(model, work)
        cfg, info = _model_info(source, checkpoint_dir or model, prompt_tokens, new_tokens, threads, repeats, bandwidth)
        gc.collect()
        prompt = np.random.default_rng(0).integers(0, info["vocab_size"], prompt_tokens).tolist()
        bench = _GenerateBench(source, cfg, work, prompt, threads, info, log)
        for name in (b for b in BACKENDS if b in backends):  # RUNTIMES' order: torch's rows before any export
            reason = bench.skip_reason(name)
            if reason:
                skipped[name] = reason
                continue
            log(f"generating with {name} ({RUNTIMES[name].runtime}, {RUNTIMES[name].precision})...")
            results[name] = bench.time(name, new_tokens, repeats)
            gc.collect()
        info["bounds"] = bounds(bench.onnx_dirs, bandwidth)
        if bench.onnx_dirs:  # after the timings: scoring is not what a backend waits for
            info["quality"] = bench_quality(bench.onnx_dirs, quality_text(quality_data, work), not checkpoint_dir, log)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    _compare_backends(results)
    _compare_to_loop(results)
    _share_of_bound(results, info["bounds"])
    return info | {"backends": results, "skipped": skipped}


# ---- the whole run -------------------------------------------------------------------------

def check_inputs(sections, experiment, overrides: tuple, checkpoint_dir: Optional[str], backends,
                 model: str = "tiny", prompt_tokens: int = 32, new_tokens: int = 128) -> None:
    """Every input a section will use, checked before a minute of measuring the machine: the train
    section's experiment as ``gptx validate`` checks it (data, memory, ...), the generate section's
    backends and context."""
    from gptx import checkpoint as ckpt
    from gptx.config import load_experiment
    from gptx.errors import ConfigError
    from gptx.training.plan import plan_run

    if "train" in sections:
        file = experiment or default_experiment()
        try:
            plan_run(load_experiment(file, list(overrides)), outputs=False)
        except ConfigError as err:
            raise err.located(str(file)) from None
    if "generate" in sections:
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise GptxError(f"--backends: unknown {', '.join(unknown)}; choose from {', '.join(BACKENDS)}")
        context = MODEL_SIZES[model]["block_size"]
        if checkpoint_dir:
            stored = ckpt.read_meta(ckpt.resolve(checkpoint_dir)).get("config")
            context = stored.get("model", {}).get("block_size") if isinstance(stored, dict) else None
        if isinstance(context, int) and prompt_tokens + new_tokens > context:
            raise GptxError(f"--prompt-tokens + --new-tokens = {prompt_tokens + new_tokens} exceeds the model's "
                            f"context of {context}")


def run(sections=SECTIONS, experiment=None, overrides: tuple = (), train_steps: int = 50,
        warmup_steps: int = 5, model: str = "tiny", checkpoint_dir: Optional[str] = None, backends=BACKENDS,
        prompt_tokens: int = 32, new_tokens: int = 128, repeats: int = 3, peak_seconds: float = 1.0,
        threads: Optional[int] = None, log: Callable[[str], None] = lambda s: None,
        speedrun_seeds: int = 3, speedrun_steps: Optional[int] = None, nanogpt: Optional[str] = None,
        busy: int = 1, quality_data: Optional[str] = None, speedrun_overrides: tuple = ()) -> dict:
    import torch

    from gptx import speedrun

    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise GptxError(f"--only: unknown section {', '.join(bad)}; choose from {', '.join(SECTIONS)}")
    if nanogpt is not None and "speedrun" not in sections:
        raise GptxError("--nanogpt: only the speedrun section runs nanoGPT; add --only speedrun")
    check_inputs(sections, experiment, overrides, checkpoint_dir, backends, model, prompt_tokens, new_tokens)
    if speedrun_overrides and "speedrun" not in sections:
        raise GptxError("--speedrun-set: only the speedrun section runs the speedrun recipe; add --only speedrun")
    speedrun.check_nanogpt(nanogpt)
    speedrun.check_overrides(speedrun_overrides)
    if quality_data is not None and "generate" not in sections:
        raise GptxError("--quality-data: only the generate section scores its exports; add --only generate")
    check_quality_data(quality_data, checkpoint_dir, model)
    if threads:
        torch.set_num_threads(threads)
    out: dict = {"machine": machine()}
    t0 = time.perf_counter()
    peak = bandwidth = None
    if "peak" in sections or "train" in sections:  # train's MFU needs the peak of this run, on its device
        device = train_device(experiment, tuple(overrides)) if "train" in sections else "cpu"
        log(f"measuring matmul peak (fp32, bf16) on {device}...")
        max_n = 16384 if device.startswith("cuda") else 2048
        peak = {dt: matmul_peak(dt, peak_seconds, max_n, device) for dt in ("float32", "bfloat16")}
        if "peak" in sections:
            out["peak"] = peak
    if "peak" in sections or "generate" in sections:  # the bound of batch-1 decoding
        log("measuring memory bandwidth...")
        bandwidth = memory_bandwidth(peak_seconds)
        if "peak" in sections:
            out["memory_bandwidth"] = bandwidth
    if "train" in sections:
        log(f"training {train_steps} steps of {experiment or default_experiment()}...")
        out["train"] = bench_train(experiment, tuple(overrides), train_steps, warmup_steps, peak, threads)
        t = out["train"]
        if t["mfu_peak"] == "float32" and t["device"] == "cpu":  # a neighbour's burst can depress one reading
            again = matmul_peak("float32", peak_seconds)
            if again["gflops"] > peak["float32"]["gflops"]:
                peak["float32"] = again
                t["mfu"] = round(t["model_gflops"] / again["gflops"], 4)
    if "generate" in sections:
        out["generate"] = bench_generate(model, checkpoint_dir, tuple(backends), prompt_tokens, new_tokens, repeats, log,
                                         bandwidth, quality_data)
    if "busy" in sections:
        log(f"training {train_steps} steps quiet and beside {busy} busy process(es), gptx's threads and fixed...")
        out["busy"] = bench_busy(experiment, tuple(overrides), train_steps, warmup_steps, busy, threads)
    if "speedrun" in sections:
        out["speedrun"] = speedrun.run(speedrun_seeds, steps=speedrun_steps, nanogpt=nanogpt, log=log,
                                       overrides=speedrun_overrides)
    if "startup" in sections:
        log(f"starting gptx run {speedrun.RECIPES['speedrun']} {repeats} time(s)...")
        out["startup"] = bench_startup(repeats)
    out["machine"]["load_after"] = machine()["load"]
    out["seconds"] = round(time.perf_counter() - t0, 1)
    return out


# ---- start-up ------------------------------------------------------------------------------

STARTUP_STEPS = 2  # the first step is what start-up ends with; a second shows the run goes on


def bench_startup(repeats: int) -> dict:
    """``gptx run speedrun_char.toml`` as ``repeats`` whole processes, each reading its own
    ``startup_s`` from its run.json, alternating with ``python -c "import torch"`` timed from
    outside, so a drift in the machine's load hits both. The MLflow store is created before the
    first run: its one-time creation is not what every run waits for."""
    import sys

    from gptx import runs, speedrun, tracking

    recipe = speedrun.experiments() / speedrun.RECIPES["speedrun"]
    with tempfile.TemporaryDirectory(prefix="gptx-startup-") as tmp:
        work = Path(tmp)
        store = "sqlite:///" + str(work / "mlflow.db")
        tracking.ensure_sqlite_store(store)
        torch_s, startup_s = [], []
        for i in range(repeats):
            torch_s.append(speedrun.timed_process([sys.executable, "-c", "import torch"], work, "startup: import torch")[1])
            name = f"startup-{i + 1}"
            speedrun.timed_process(
                [sys.executable, "-m", "gptx", "run", str(recipe), "--quiet",
                 "--set", f"training.max_steps={STARTUP_STEPS}", "--set", "training.final_eval_tokens=0",
                 "--set", f"training.out_dir={json.dumps(str(work / 'runs'))}", "--set", f"tracking.run_name='{name}'",
                 "--set", "tracking.enabled=true", "--set", f"tracking.uri={json.dumps(store)}"],
                work, f"startup: gptx run {recipe.name}")
            startup_s.append(runs.read_run_file(work / "runs" / recipe.stem / name).get("startup_s"))
    if None in startup_s:
        raise GptxError("startup: run.json has no startup_s (this system has no /proc to read a process's age from)")
    return {"experiment": recipe.name, "steps": STARTUP_STEPS, "repeats": repeats, "tracking": "sqlite",
            "startup_s": round(statistics.median(startup_s), 2), "startup_runs_s": [round(x, 2) for x in startup_s],
            "import_torch_s": round(statistics.median(torch_s), 2), "import_torch_runs_s": [round(x, 2) for x in torch_s]}


def startup_table(s: dict) -> str:
    return (f"start-up: gptx run {s['experiment']} (tracked) to its first step done: {s['startup_s']:.2f} s, median of "
            f"{s['repeats']} process(es) ({', '.join(f'{x:.2f}' for x in s['startup_runs_s'])}); "
            f"python -c \"import torch\": {s['import_torch_s']:.2f} s")


def _bound_lines(g: dict) -> list[str]:
    if not any(b["bound_tok_s"] for b in g.get("bounds", {}).values()):
        return []
    per = "; ".join(f"{k} {b['mib_per_token']:,.1f} MiB -> {b['bound_tok_s']:,.1f} tok/s" for k, b in g["bounds"].items())
    shares = ", ".join(f"{name} {r['share_of_bound'] * 100:.0f}%" for name, r in g["backends"].items() if r.get("share_of_bound"))
    return [f"  bound (weights one decode step reads, at the measured bandwidth): {per}",
            f"  decoding's share of its precision's bound: {shares or '-'}"]


def _quality_lines(q: Optional[dict]) -> list[str]:
    if not q:
        return []
    rows = [f"{k} {q[k]['perplexity']:,.3f}" + (f" ({q[k]['vs_fp32_pct']:+.2f}%)" if "vs_fp32_pct" in q[k] else "")
            for k in ("fp32", "int8", "int4") if k in q]
    lines = [f"  perplexity on {Path(q['data']).name} ({q['tokens']:,} tokens): {', '.join(rows)}"]
    return lines + ([f"  ({q['note']})"] if q.get("note") else [])


def web_line(r: dict) -> str:
    p = r["page"]
    isolated = "cross-origin isolated" if p["cross_origin_isolated"] else "NOT cross-origin isolated"
    return (f"  web: gptx web's page in headless Chromium ({p['backend']}, {p['threads']} thread(s), {isolated}, "
            f"proxy {'on' if p['proxy'] else 'off'}): {r['vs_ort_paired']:.2f}x the ort loop's tokens/s run alternately "
            f"with it; its first generation {r['first_tokens_per_s']:,.1f} tok/s, before V8 optimizes the WebAssembly "
            f"({r['warmup_runs']} warm-up run(s))")


def read_saved(path: str) -> dict:
    """A saved ``gptx bench --json`` output with a generate section (``--deploy-table FILE``)."""
    name = f"--deploy-table: {path}"
    try:
        result = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise GptxError(f"{name}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise GptxError(f"{name}: cannot be read ({type(err).__name__})") from None
    except ValueError as err:
        raise GptxError(f"{name}: not JSON ({err})") from None
    g = result.get("generate") if isinstance(result, dict) else None
    if not isinstance(g, dict) or not isinstance(g.get("backends"), dict) or not g["backends"]:
        raise GptxError(f"{name}: no generate section with backend rows (save one with "
                        "gptx bench --only generate --json > FILE)")
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)  # noqa: E731
    for backend, r in g["backends"].items():
        bad = "tokens_per_s" if not isinstance(r, dict) or not number(r.get("tokens_per_s")) else \
            next((k for k in DEPLOY_NUMBERS if r.get(k) is not None and not number(r[k])), None)
        if bad:
            raise GptxError(f"{name}: generate.backends.{backend}.{bad}: not a number")
    for key in ("quality", "skipped"):
        if not isinstance(g.get(key, {}), dict):
            raise GptxError(f"{name}: generate.{key}: not an object")
    for precision, q in g.get("quality", {}).items():
        if precision in ("fp32", "int8", "int4") and not (isinstance(q, dict) and isinstance(q.get("vs_fp32_pct", 0), (int, float))):
            raise GptxError(f"{name}: generate.quality.{precision}: not an object with a numeric vs_fp32_pct")
    return result


DEPLOY_NUMBERS = ("ttft_ms", "peak_rss_mib", "share_of_bound", "vs_loop", "same_tokens_as_torch")  # None or a number


def deploy_table(result: dict) -> str:
    """The deployment docs' table (markdown) from a ``gptx bench --json`` result: one row per
    runtime x precision measured, with its speed, first-token latency, memory, share of its
    precision's bound, speed against gptx's Python loop on the same export, greedy ids equal to
    PyTorch's, and the precision's perplexity change against fp32 (``quality``)."""
    g, m = result["generate"], result.get("machine") if isinstance(result.get("machine"), dict) else {}
    quality = g.get("quality") or {}
    fmt = lambda v, f, suffix="": "-" if v is None else format(v, f) + suffix  # noqa: E731
    lines = [f"{g.get('model')}: batch 1, {g.get('prompt_tokens')}-token prompt, {g.get('new_tokens')} new tokens, "
             f"greedy, {g.get('threads')} threads; {m.get('cpu', 'CPU not recorded')}, {m.get('cores', '?')} cores.", "",
             "| runtime | precision | tokens/s | first token (ms) | peak RSS (MiB) | share of its bound | vs Python loop "
             "| same ids as PyTorch | perplexity vs fp32 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for name, r in g["backends"].items():
        kind = RUNTIMES.get(name, Runtime(name))
        change = (quality.get(kind.precision) or {}).get("vs_fp32_pct")
        ppl = "random weights" if quality.get("random_weights") and kind.precision != "fp32" else \
            ("0 (reference)" if kind.precision == "fp32" and quality else fmt(change, "+.2f", " %"))
        same = fmt(r.get("same_tokens_as_torch"), "d", f" of {g.get('new_tokens')}")
        lines.append(f"| {kind.runtime} | {kind.precision} | {r['tokens_per_s']:,.1f} | {fmt(r.get('ttft_ms'), '.1f')} "
                     f"| {fmt(r.get('peak_rss_mib'), ',.0f')} | {fmt(r.get('share_of_bound'), '.0%')} "
                     f"| {fmt(r.get('vs_loop'), '.2f', 'x')} | {same} | {ppl} |")
    lines += [f"| {name}: skipped | | | | | | | | {why} |" for name, why in g.get("skipped", {}).items()]
    return "\n".join(lines)


def table(result: dict) -> str:
    """A readable report of ``run``'s result."""
    m = result["machine"]
    lines = [f"machine: {m['cpu']}, {m['cores']} cores, {m['threads']} threads, torch {m['torch']} "
             f"({m['cpu_capability']}; {', '.join(m.get('cpu_flags', [])) or 'no flags read'}), "
             f"load {m['load']} -> {m.get('load_after')}"]
    if "peak" in result:
        p = result["peak"]
        lines.append("")
        lines.append("matmul peak: " + ", ".join(f"{k} {v['gflops']:,.1f} GFLOP/s (n={v['n']})" for k, v in p.items()))
    if "memory_bandwidth" in result:
        lines.append(f"memory bandwidth: {result['memory_bandwidth']['gbps']:.1f} GB/s (reading {result['memory_bandwidth']['mib']} MiB)")
    if "train" in result:
        t = result["train"]
        mfu = f"{t['mfu'] * 100:.1f}% of the {t['mfu_peak']} peak" if t["mfu"] is not None else "n/a"
        lines += ["", f"training {t['experiment']} ({t['parameters'] / 1e6:.2f}M parameters, {t['dtype']}"
                      f"{', compiled' if t['compile'] else ''}, {t['device']}):",
                  f"  {t['tokens_per_s']:,.0f} tokens/s (median of {t['steps']} steps, {t['step_ms_median']:.1f} ms/step; "
                  f"best {t['tokens_per_s_best']:,.0f}), {t['model_gflops']:.1f} model GFLOP/s, MFU {mfu}",
                  f"  loss {t['loss_first']} -> {t['loss_last']}; warm-up {t['warmup_steps']} steps {t['warmup_s']} s"]
        f = t["gemm_floor"]
        if f["gemms"]:
            lines.append(f"  GEMM floor: its {f['gemms']} matrix products alone take {f['ms']:.1f} ms ({f['gflops']:,.1f} GFLOP/s), "
                         f"{f['share_of_step'] * 100:.0f}% of the step: at most {f['max_speedup']:.2f}x faster "
                         "without faster products")
    if "generate" in result:
        g = result["generate"]
        lines += ["", f"generation: {g['model']} ({g['parameters'] / 1e6:.1f}M parameters), batch 1, "
                      f"{g['prompt_tokens']}-token prompt, {g['new_tokens']} new tokens, greedy, {g['threads']} threads"]
        if g.get("fp32_bandwidth_bound_tok_s"):
            lines.append(f"  fp32 weights {g['fp32_weights_mib']:,.0f} MiB, read once per token: at most "
                         f"{g['fp32_bandwidth_bound_tok_s']:,.1f} tok/s at the measured bandwidth (int8 reads 1/4 of it, int4 1/8)")
        header = f"  {'backend':<10} {'tok/s':>9} {'decode':>9} {'TTFT ms':>9} {'peak MiB':>9} {'vs HF':>6} {'vs loop':>8} {'same':>5}"
        lines.append(header)
        for name, r in g["backends"].items():
            fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
            lines.append(f"  {name:<10} {r['tokens_per_s']:>9,.1f} {fmt(r['decode_tokens_per_s'], ',.1f'):>9} "
                         f"{r['ttft_ms']:>9.1f} {fmt(r['peak_rss_mib'], ',.0f'):>9} {fmt(r['vs_hf'], '.2f'):>6} "
                         f"{fmt(r.get('vs_loop'), '.2f'):>8} {fmt(r['same_tokens_as_torch'], 'd'):>5}")
        for name, why in g["skipped"].items():
            lines.append(f"  {name}: skipped ({why})")
        if "web" in g["backends"]:
            lines.append(web_line(g["backends"]["web"]))
        if "kv_cache" in g:
            c = g["kv_cache"]
            lines.append(f"  torch-kv8: PyTorch with kv_cache = \"int8\": {c['int8_bytes_per_token_per_layer']:,} cache bytes per "
                         f"token and layer (codes + scales) against float32's {c['float32_bytes_per_token_per_layer']:,} "
                         f"({c['saving']}x smaller)")
        lines.append("  (same: greedy tokens identical to PyTorch's before the first difference)")
        lines += _bound_lines(g) + _quality_lines(g.get("quality"))
    if "busy" in result:
        lines += ["", busy_table(result["busy"])]
    if "speedrun" in result:
        from gptx import speedrun

        lines += ["", speedrun.table(result["speedrun"])]
    if "startup" in result:
        lines += ["", startup_table(result["startup"])]
    lines.append("")
    lines.append(f"{result['seconds']} s in all")
    return "\n".join(lines)
