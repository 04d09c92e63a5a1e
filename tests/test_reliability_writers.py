"""Data loss and two writers, through the real CLI: gptx deletes only what it wrote itself
(``gptx prepare`` reruns, failures, leftovers that only look like gptx's), a prepare stopped by
SIGTERM or kill -9 leaves no worker process and the output as it was, and a run directory has one
owner (a second ``gptx run --resume`` while the first still trains is refused)."""
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from helpers import SHAKESPEARE, gptx, write_experiment

from gptx import shards


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def prepare_args(src: Path, out: Path, *extra) -> list:
    return ["prepare", src, "-o", out, "--tokenizer", "byte", "--shard-tokens", "20000", "--quiet", *extra]


def start_gptx(*args, cwd=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "gptx", *map(str, args)], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_for(condition, proc: subprocess.Popen, what: str, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while not condition():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended ({proc.returncode}) before {what}: {proc.stderr.read()}")
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def one_error_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), stderr
    return lines[0]


# ---- gptx prepare deletes only what it wrote ---------------------------------------------------

def test_a_rerun_keeps_a_file_gptx_did_not_write_unless_forced(tmp_path):
    out = tmp_path / "out"
    gptx(*prepare_args(SHAKESPEARE, out), check=True)
    first = (out / shards.MANIFEST).read_text()
    (out / "notes.txt").write_text("my notes")
    r = gptx(*prepare_args(SHAKESPEARE, out, "--val-fraction", "0.2"))
    assert r.returncode == 2
    line = one_error_line(r.stderr)
    assert str(out) in line and "notes.txt" in line and "--force" in line
    assert (out / "notes.txt").read_text() == "my notes" and (out / shards.MANIFEST).read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary left either
    gptx(*prepare_args(SHAKESPEARE, out, "--val-fraction", "0.2", "--force"), check=True)
    assert not (out / "notes.txt").exists() and json.loads((out / shards.MANIFEST).read_text())["val_fraction"] == 0.2
    gptx(*prepare_args(SHAKESPEARE, out), check=True)  # only gptx's own files: replaced without --force


def test_prepare_refuses_to_replace_the_folder_holding_its_source_or_the_working_directory(tmp_path):
    out = tmp_path / "out"
    gptx(*prepare_args(SHAKESPEARE, out), check=True)
    src = out / "input.txt"
    src.write_text(SHAKESPEARE.read_text()[:50_000])
    r = gptx(*prepare_args(src, out, "--force"))
    assert r.returncode == 2 and "refusing to replace a directory that contains" in one_error_line(r.stderr)
    assert src.is_file()
    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.txt").write_text("kept")
    r = gptx(*prepare_args(SHAKESPEARE, ".", "--force"), cwd=here)
    assert r.returncode == 2 and "refusing to replace" in one_error_line(r.stderr)
    assert (here / "mine.txt").read_text() == "kept"


def test_force_never_replaces_the_home_directory(tmp_path):
    """--force replaces a folder whole: never $HOME (prepare and export alike), from wherever it runs."""
    from helpers import tiny_checkpoint

    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir(), work.mkdir()
    (home / ".bashrc").write_text("kept")
    env = {"HOME": str(home)}
    r = gptx(*prepare_args(SHAKESPEARE, home, "--force"), cwd=work, env=env)
    assert r.returncode == 2 and f"{home}: refusing to replace a directory that contains {home}" in one_error_line(r.stderr)
    ck = tiny_checkpoint(tmp_path / "run")
    r = gptx("export", ck, "-o", home, "--force", "--no-track", cwd=work, env=env)
    assert r.returncode == 2 and f"{home}: refusing to replace a directory that contains {home}" in one_error_line(r.stderr)
    assert sorted(p.name for p in home.iterdir()) == [".bashrc"] and (home / ".bashrc").read_text() == "kept"


def test_a_failing_prepare_removes_only_its_own_temporary(tmp_path):
    """The failing prepare creates fresh/ for its output; meanwhile the user puts a file there and
    another prepare finishes fresh/a. Its failure removes neither (it removed all of fresh/)."""
    bad = tmp_path / "late-binary.txt"
    bad.write_bytes(SHAKESPEARE.read_bytes() * 12 + b"\x00tail")  # the NUL shows up only at the end
    fresh = tmp_path / "fresh"
    proc = start_gptx(*prepare_args(bad, fresh / "b", "--workers", "1"))
    wait_for(lambda: list(fresh.glob(".b.partial-*/part_000001.bin")), proc, "the failing prepare started writing")
    (fresh / "notes.txt").write_text("mine")
    gptx(*prepare_args(SHAKESPEARE, fresh / "a"), check=True)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "looks binary" in one_error_line(err)
    assert sorted(p.name for p in fresh.iterdir()) == ["a", "notes.txt"]
    assert (fresh / "notes.txt").read_text() == "mine" and (fresh / "a" / shards.MANIFEST).is_file()


def test_a_failing_prepare_removes_the_folders_it_created_while_they_are_empty(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"text\x00binary")
    r = gptx(*prepare_args(bad, tmp_path / "x" / "y" / "out"))
    assert r.returncode == 2 and "looks binary" in one_error_line(r.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.txt"]


def test_leftovers_are_removed_only_when_gptx_made_them(tmp_path):
    """A name proves nothing: a user's ``.out.partial-<dead pid>-abc123`` folder or file, or a
    finished output given such a name, survives; a killed prepare's own temporary is removed."""
    out, dead = tmp_path / "out", dead_pid()
    users_dir = tmp_path / f".out.partial-{dead}-abc123"
    users_dir.mkdir()
    (users_dir / "data.bin").write_text("mine")
    users_file = tmp_path / f".out.tmp-{dead}-abcdef"
    users_file.write_text("mine too")
    unmarked_empty = tmp_path / f".out.partial-{dead}-0a0b0c"  # killed between mkdir and its marker
    unmarked_empty.mkdir()
    other_output = tmp_path / f".out.old-{dead}-fedcba"
    gptx(*prepare_args(SHAKESPEARE, other_output), check=True)  # another prepare's finished output
    src = tmp_path / "big.txt"
    src.write_text(SHAKESPEARE.read_text() * 8)
    proc = start_gptx(*prepare_args(src, out, "--workers", "1"))
    wait_for(lambda: list(tmp_path.glob(".out.partial-*/part_000002.bin")), proc, "prepare started writing")
    proc.kill()
    proc.communicate()
    killed = [p for p in tmp_path.glob(".out.partial-*") if p not in (users_dir, unmarked_empty)]
    assert len(killed) == 1 and not out.exists()
    gptx(*prepare_args(SHAKESPEARE, out), check=True)
    assert not killed[0].exists() and not unmarked_empty.exists() and (out / shards.MANIFEST).is_file()
    assert (users_dir / "data.bin").read_text() == "mine" and users_file.read_text() == "mine too"
    assert (other_output / shards.MANIFEST).is_file()


def test_a_file_added_to_out_while_prepare_runs_is_kept(tmp_path):
    """OUT is checked again just before it is replaced, not only at the start."""
    out, src = tmp_path / "out", tmp_path / "big.txt"
    gptx(*prepare_args(SHAKESPEARE, out), check=True)
    before = (out / shards.MANIFEST).read_text()
    src.write_text(SHAKESPEARE.read_text() * 8)
    proc = start_gptx(*prepare_args(src, out, "--workers", "1"))
    wait_for(lambda: list(tmp_path.glob(".out.partial-*/part_000001.bin")), proc, "prepare started writing")
    (out / "notes.txt").write_text("added meanwhile")
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2 and "holds files gptx did not write (notes.txt)" in one_error_line(err)
    assert (out / "notes.txt").read_text() == "added meanwhile" and (out / shards.MANIFEST).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "out"]


def test_two_prepares_into_one_folder_at_once_leave_one_whole_output(tmp_path):
    out = tmp_path / "out"
    src = tmp_path / "big.txt"
    src.write_text(SHAKESPEARE.read_text() * 4)
    procs = [start_gptx(*prepare_args(src, out, "--workers", "1")) for _ in range(2)]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "out"]
    meta = json.loads((out / shards.MANIFEST).read_text())
    files = {s["file"] for split in meta["shards"].values() for s in split}
    assert {p.name for p in out.iterdir()} == files | {shards.MANIFEST}


# ---- signals during gptx prepare ---------------------------------------------------------------

def start_parallel_prepare(tmp_path: Path, out: Path) -> tuple[subprocess.Popen, list[psutil.Process]]:
    """A prepare with 2 tokenizing workers, caught while they are busy: the process and its workers."""
    src = tmp_path / "big.txt"
    if not src.exists():
        src.write_text(SHAKESPEARE.read_text() * 40)  # ~45 MB: several seconds of GPT-2 BPE
    proc = start_gptx("prepare", src, "-o", out, "--tokenizer", "gpt2", "--workers", "2", "--quiet")
    parent = psutil.Process(proc.pid)
    wait_for(lambda: len(parent.children()) >= 2 and list(tmp_path.glob(f".{out.name}.partial-*")), proc,
             "the workers started")
    return proc, parent.children()


def gone_or_killed(processes: list[psutil.Process], seconds: float = 10) -> list[int]:
    """The pids still alive ``seconds`` later (then killed, so a failing test leaves none behind)."""
    _, alive = psutil.wait_procs(processes, timeout=seconds)
    for p in alive:
        p.kill()
    return [p.pid for p in alive]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_a_stopped_prepare_leaves_no_worker_and_the_output_as_it_was(tmp_path, sig):
    out = tmp_path / "out"
    gptx(*prepare_args(SHAKESPEARE, out), check=True)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    proc, workers = start_parallel_prepare(tmp_path, out)
    assert len(workers) >= 2
    proc.send_signal(sig)
    survivors = gone_or_killed(workers)  # orphaned workers would hold the pipes open: check before reading them
    _, err = proc.communicate(timeout=60)
    assert not survivors
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert one_error_line(err) == f"Error: {out}: stopped by SIGTERM before the output was complete; nothing was written there"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "out"]
    else:
        assert proc.returncode == -signal.SIGKILL
        gptx(*prepare_args(SHAKESPEARE, out), check=True)  # the next prepare removes the leftover
        assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt", "out"]


def test_sigterm_before_a_first_output_leaves_nothing(tmp_path):
    out = tmp_path / "new" / "out"
    (tmp_path / "new").mkdir()
    proc, workers = start_parallel_prepare(tmp_path / "new", out)
    proc.send_signal(signal.SIGTERM)
    survivors = gone_or_killed(workers)
    _, err = proc.communicate(timeout=60)
    assert not survivors
    assert proc.returncode == 143 and "stopped by SIGTERM" in one_error_line(err)
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == ["big.txt"]


# ---- one writer per run directory --------------------------------------------------------------

def test_resume_while_the_run_still_trains_is_refused_and_the_run_goes_on(tmp_path):
    f = write_experiment(tmp_path / "exp.toml")
    overrides = ["--set", "training.max_steps=3000", "--set", "training.eval_interval=100",
                 "--set", "training.checkpoint_interval=20", "--set", "training.sample_tokens=0"]
    first = start_gptx("run", f, *overrides, "--quiet", cwd=tmp_path)
    runs = tmp_path / "runs"
    wait_for(lambda: list(runs.glob("*/*/checkpoints/step-*")), first, "the first checkpoint")
    run_dir = next(runs.glob("*/*"))
    second = gptx("run", f, *overrides, "--resume", "--quiet", cwd=tmp_path)
    assert first.poll() is None, "the first run ended before the second one was refused"
    assert second.returncode == 2, second.stderr
    assert one_error_line(second.stderr) == (f"Error: --resume: {run_dir} is in use by another gptx process "
                                             f"(pid {first.pid}); wait for it to finish or stop it")
    assert json.loads((run_dir / "run.json").read_text())["pid"] == first.pid
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err
    info = json.loads((run_dir / "run.json").read_text())
    assert info["status"] == "FINISHED" and info["step"] == 3000 and info["pid"] == first.pid


def test_a_run_killed_with_9_leaves_no_stale_lock(tmp_path):
    f = write_experiment(tmp_path / "exp.toml")
    overrides = ["--set", "training.max_steps=3000", "--set", "training.eval_interval=100",
                 "--set", "training.checkpoint_interval=20", "--set", "training.sample_tokens=0"]
    first = start_gptx("run", f, *overrides, "--quiet", cwd=tmp_path)
    wait_for(lambda: list((tmp_path / "runs").glob("*/*/checkpoints/step-*")), first, "the first checkpoint")
    first.kill()
    first.communicate()
    r = gptx("run", f, *overrides, "--set", "training.max_steps=60", "--resume", "--quiet", cwd=tmp_path)
    assert r.returncode == 0, r.stderr


def test_a_worker_killed_from_outside_is_one_line_and_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    proc, workers = start_parallel_prepare(tmp_path, out)
    workers[0].kill()  # as the OOM killer would
    survivors = gone_or_killed(workers)
    _, err = proc.communicate(timeout=60)
    assert not survivors
    assert proc.returncode == 2
    assert one_error_line(err) == ("Error: a tokenizing worker process died (killed by a signal or out of memory); "
                                   "try fewer --workers (now 2)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.txt"]
