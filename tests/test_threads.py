"""gptx.threads: as many threads as CPUs are free, an explicit count kept. Real processes make
the load; no timing thresholds (the speed itself is `gptx bench --only busy`)."""
import json
import os
import subprocess
import sys

import pytest
from helpers import gptx, write_experiment

from gptx.threads import TAKEN, CpuSample, busy_elsewhere, threads_for

BUSY = [sys.executable, "-c", "while True: pass"]


def _env_without_thread_pins() -> dict:
    return {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # conftest pins 1 for the suite


@pytest.mark.parametrize("available, busy, want", [
    (2, 0.0, 2), (2, TAKEN - 0.01, 2),  # light background work leaves both CPUs ours
    (2, TAKEN + 0.01, 1), (2, 0.67, 1), (2, 1.0, 1),  # one busy neighbour: one thread
    (2, 2.0, 1), (2, 5.0, 1),  # never fewer than one
    (8, 1.0, 7), (8, 2.6, 5), (1, 0.0, 1),
])
def test_threads_are_the_cpus_others_leave_free(available, busy, want):
    assert threads_for(available, busy) == want


def test_busy_elsewhere_is_the_cpu_time_of_other_processes():
    before = CpuSample(busy=1000, total=4000, own=300)
    after = CpuSample(busy=1300, total=4200, own=400)  # 200 ticks over 2 CPUs: 100 each; 300 busy, 100 ours
    assert busy_elsewhere(before, after, n_cpus=2) == pytest.approx(2.0)
    assert busy_elsewhere(before, CpuSample(1000, 4000, 300), 2) == 0.0  # no time passed


def _python(code: str, **kw) -> str:
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=_env_without_thread_pins(), **kw)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_available_cpus_follow_the_affinity():
    """A process pinned to one CPU (taskset, docker --cpuset-cpus) chooses one thread."""
    out = _python("import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
                  "from gptx.threads import available_cpus, choose_threads; print(available_cpus(), choose_threads())")
    assert out == "1 1"


def test_every_cpu_busy_elsewhere_leaves_one_thread():
    n = len(os.sched_getaffinity(0))
    procs = [subprocess.Popen(BUSY) for _ in range(n)]
    try:
        out = _python("from gptx.threads import choose_threads; print(choose_threads(sample_seconds=0.5))")
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert out == "1"


@pytest.mark.parametrize("threads, free, spins", [(1, 2, False), (2, 2, True), (2, 1, False), (3, 2, False), (4, 8, True)])
def test_onnxruntime_threads_spin_only_with_a_cpu_each(monkeypatch, threads, free, spins):
    from gptx import threads as th

    monkeypatch.setattr(th, "_free_threads", lambda seconds: free)
    assert th.spinning_pays(threads) is spins


def _matmul_graph(path):
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
                              [onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_a_session_with_a_cpu_per_thread_spins(tmp_path, monkeypatch):
    from gptx import threads as th
    from gptx.export.runtime import make_session

    monkeypatch.setattr(th, "_free_threads", lambda seconds: 2)
    options = make_session(_matmul_graph(tmp_path / "m.onnx"), threads=2).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    options = make_session(tmp_path / "m.onnx", threads=1).get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"


def test_sessions_on_a_busy_machine_sleep_instead_of_spinning(tmp_path):
    """A real onnxruntime session beside as many busy processes as CPUs: two threads asked for,
    neither may spin (one spinning on a CPU another process wants stalls both)."""
    _matmul_graph(tmp_path / "m.onnx")
    code = (f"from gptx.export.runtime import make_session; s = make_session({str(tmp_path / 'm.onnx')!r}, threads=2); "
            "o = s.get_session_options(); print(o.intra_op_num_threads, o.get_session_config_entry('session.intra_op.allow_spinning'))")
    n = len(os.sched_getaffinity(0))
    procs = [subprocess.Popen(BUSY) for _ in range(n)]
    try:
        out = _python(code)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert out == "2 0"


def test_the_governor_follows_the_load_between_steps_and_says_so():
    """Training starts with 2 threads; beside as many busy processes as CPUs, the next tick drops
    to one thread and says why."""
    n = len(os.sched_getaffinity(0))
    procs = [subprocess.Popen(BUSY) for _ in range(n)]
    code = """
import time, torch
from gptx.threads import ThreadGovernor
g = ThreadGovernor()
torch.set_num_threads(2)
said, t0 = [], time.perf_counter()
while time.perf_counter() - t0 < 1.5:
    torch.randn(64, 64) @ torch.randn(64, 64)
    line = g.tick()
    if line:
        said.append(line)
print(torch.get_num_threads(), len(g.changes), said[0] if said else "")
"""
    try:
        threads, changes, line = _python(code).split(" ", 2)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert (threads, changes) == ("1", "1")
    assert line.startswith("threads 2 -> 1: other processes use") and "training.threads or OMP_NUM_THREADS" in line


def test_an_explicit_count_is_kept_under_any_load():
    out = _python("import torch\nfrom gptx.threads import ThreadGovernor\n"
                  "g = ThreadGovernor(3)\ng.next = 0\nprint(torch.get_num_threads(), g.tick(), g.fixed)")
    assert out == "3 None 3"
    env = _env_without_thread_pins() | {"OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, "-c", "from gptx.threads import choose_threads; print(choose_threads())"],
                          capture_output=True, text=True, env=env, timeout=120)
    assert proc.stdout.strip() == "2"


@pytest.mark.slow
def test_bench_busy_section_reports_both_choices_quiet_and_loaded(tmp_path):
    exp = write_experiment(tmp_path / "e.toml")
    proc = gptx("bench", "--only", "busy", "--busy", "1", "--experiment", exp, "--train-steps", "2",
                "--warmup-steps", "0", "--json", check=True, timeout=600)
    b = json.loads(proc.stdout)["busy"]
    assert b["busy_processes"] == 1 and b["available_cpus"] == len(os.sched_getaffinity(0))
    for mode in ("auto", "fixed"):
        r = b[mode]
        assert r["quiet_tokens_per_s"] > 0 and r["busy_tokens_per_s"] > 0
        assert r["ratio"] == pytest.approx(r["busy_tokens_per_s"] / r["quiet_tokens_per_s"], abs=1e-3)
    assert b["fixed"]["quiet_threads"] == b["fixed"]["busy_threads"] == b["fixed_threads"]
    table = gptx("bench", "--only", "busy", "--experiment", exp, "--train-steps", "1", "--warmup-steps", "0", check=True)
    assert "training beside 1 busy process(es)" in table.stdout and "gptx's choice vs fixed" in table.stdout
    assert gptx("bench", "--only", "busy", "--busy", "0").returncode == 2


def test_after_the_first_reading_a_change_needs_two_readings_in_a_row():
    """A burst of someone else's work (one reading) does not move the count; a lasting load does."""
    import torch

    from gptx.threads import ThreadGovernor

    before = torch.get_num_threads()
    try:
        g = ThreadGovernor(None)
        g.fixed, g.available = None, 2  # as on a 2-CPU machine without OMP_NUM_THREADS
        torch.set_num_threads(2)
        assert g.decide(0.0) is None  # the first reading: 2 is right
        assert g.decide(1.0) is None  # a burst
        assert g.decide(0.1) is None  # gone again
        assert g.decide(1.0) is None and g.decide(1.0) == 1  # a neighbour that stays
        torch.set_num_threads(1)
        assert g.decide(0.0) is None and g.decide(0.0) == 2  # it left
    finally:
        torch.set_num_threads(before)


def test_a_held_cpu_lowers_the_count_at_once_and_silently_and_comes_back():
    """While the MLflow run starts in a background thread, training leaves it a CPU; the load did
    not change, so nothing is said."""
    import torch

    from gptx.threads import ThreadGovernor

    before = torch.get_num_threads()
    try:
        g = ThreadGovernor(None)
        g.fixed, g.available, g.next = None, 2, 0  # as on a quiet 2-CPU machine without OMP_NUM_THREADS
        torch.set_num_threads(2)
        g.decide(0.0)  # the first reading: 2 is right
        g.hold(1)
        assert torch.get_num_threads() == 1 and g.for_load(0.0) == 1
        # a quiet reading (all the busy time is this process's own), whatever the suite's neighbours do
        g.sample = CpuSample(busy=1000, total=4000, own=300)
        g._sample = lambda: CpuSample(busy=1100, total=4200, own=400)
        assert g.tick() is None  # a quiet reading keeps the held CPU free, and says nothing
        g.hold(0)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
