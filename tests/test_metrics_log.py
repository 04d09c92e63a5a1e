"""metrics.jsonl: the writer the trainer uses, the reader compare and the plots use, and the
plots drawn from it (real matplotlib, real PNGs)."""
import json

import pytest

from gptx import metrics_log, plots
from gptx.errors import GptxError


def records(steps=40, evals=10, final=True, offset=0.0, loss0=4.0):
    out = []
    for s in range(1, steps + 1):
        out.append({"step": s, "seconds": offset + 0.05 * s, "train_loss": loss0 - 0.03 * s + 0.02 * (s % 3),
                    "lr": 1e-3, "tokens_per_sec": 1000.0 + s})
        if s % evals == 0:
            out.append({"step": s, "seconds": offset + 0.05 * s + 0.01, "val_loss": loss0 - 0.025 * s, "eval_train_loss": loss0 - 0.03 * s})
    if final:
        out.append({"step": steps, "seconds": offset + 0.05 * steps + 0.1, "final_val_loss": loss0 - 0.025 * steps - 0.01})
    return out


def write(path, recs, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail)
    return path


def test_writer_and_reader_round_trip(tmp_path):
    log = metrics_log.MetricsLog(tmp_path)
    log.write(1, 0.5, train_loss=3.0, lr=1e-3, tokens_per_sec=100)
    log.write(1, log.seconds(), val_loss=2.9, eval_train_loss=2.8)
    got = metrics_log.read(tmp_path / "metrics.jsonl")
    assert got[0] == {"step": 1, "seconds": 0.5, "train_loss": 3.0, "lr": 1e-3, "tokens_per_sec": 100.0}
    assert got[1]["val_loss"] == 2.9 and 0 <= got[1]["seconds"] < 5
    disabled = metrics_log.MetricsLog(tmp_path / "other", enabled=False)  # another rank: writes nothing
    disabled.write(1, 0.1, train_loss=1.0)
    assert not (tmp_path / "other").exists()


def test_a_write_that_fails_warns_once_and_training_goes_on(tmp_path, capsys):
    log = metrics_log.MetricsLog(tmp_path)
    (tmp_path / "metrics.jsonl").unlink()
    (tmp_path / "metrics.jsonl").mkdir()  # a real OSError on open (IsADirectoryError), as a full disk gives ENOSPC
    log.write(1, 0.1, train_loss=3.0)
    log.write(2, 0.2, train_loss=2.9)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("Warning: ") and "training continues" in err[0]


def test_a_resumed_run_drops_what_came_after_its_checkpoint_and_continues_the_clock(tmp_path):
    write(tmp_path / "metrics.jsonl", records(steps=30, evals=10, final=False))  # killed after step 30
    log = metrics_log.MetricsLog(tmp_path, resume_step=20)  # resumed from the step-20 checkpoint
    kept = metrics_log.read(tmp_path / "metrics.jsonl")
    assert max(r["step"] for r in kept) == 20
    assert log.seconds() >= max(r["seconds"] for r in kept)  # the wall clock goes on, never back
    fresh = metrics_log.MetricsLog(tmp_path)  # a new run in that directory starts empty
    assert metrics_log.read(tmp_path / "metrics.jsonl") == [] and fresh.seconds() < 5


def test_reader_drops_a_truncated_last_line_and_reads_an_empty_file(tmp_path):
    good = records(steps=10)
    p = write(tmp_path / "metrics.jsonl", good, tail='{"step": 11, "seconds": 0.6, "train_lo')
    assert metrics_log.read(p) == good
    assert metrics_log.read(write(tmp_path / "empty.jsonl", [])) == []


@pytest.mark.parametrize("bad, message", [
    ("not json at all\n", "line 3 is not JSON"),
    ("[1, 2]\n", "line 3 is not a JSON object"),
    ('{"step": -1, "seconds": 0}\n', "'step' must be a non-negative integer"),
    ('{"step": "5", "seconds": 0}\n', "'step' must be a non-negative integer"),
    ('{"step": 5, "seconds": NaN}\n', "'seconds' must be a non-negative number"),
    ('{"step": 5}\n', "'seconds' must be a non-negative number"),
])
def test_reader_names_the_file_and_line_of_a_tampered_record(tmp_path, bad, message):
    recs = records(steps=2, evals=100, final=False)
    p = tmp_path / "metrics.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs) + bad + json.dumps(recs[0]) + "\n")
    with pytest.raises(GptxError, match=message) as err:
        metrics_log.read(p)
    assert str(p) in str(err.value)


def test_reader_refuses_a_huge_line_without_reading_it_whole(tmp_path):
    p = tmp_path / "metrics.jsonl"
    with open(p, "w") as f:
        f.write(json.dumps(records(1)[0]) + "\n")
        f.write('{"step": 2, "seconds": 1, "x": "' + "a" * (10 * 1024 * 1024) + '"}\n')
    with pytest.raises(GptxError, match="line 2 is longer than"):
        metrics_log.read(p)


def test_reader_handles_a_long_run(tmp_path):
    p = write(tmp_path / "metrics.jsonl", records(steps=100_000, evals=1000))
    got = metrics_log.read(p)
    steps, seconds, values = metrics_log.series(got, "val_loss")
    assert len(steps) == 100 and list(steps[:2]) == [1000, 2000] and (seconds[1:] > seconds[:-1]).all()
    assert metrics_log.last(got, "final_val_loss") == pytest.approx(4.0 - 2500 - 0.01)


def is_png(path):
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_run_and_plot_groups_write_pngs(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    write(run / "metrics.jsonl", records())
    png = plots.plot_run(run, tmp_path / "one.png")
    assert is_png(png) and 10_000 < png.stat().st_size < 150_000
    groups = [("a=1", {"a": "1"}, [records(offset=o, loss0=4.0 + o) for o in (0.0, 0.1, 0.2)]),
              ("a=2", {"a": "2"}, [records(offset=o, loss0=3.9 + o) for o in (0.0, 0.1)])]
    png = plots.plot_groups(groups, tmp_path / "groups.png", "test sweep")
    assert is_png(png) and 10_000 < png.stat().st_size < 150_000
    assert not list(tmp_path.glob(".*"))  # no temporary file left


def test_curve_is_the_mean_and_band_over_seeds():
    a = records(steps=10, evals=5, loss0=4.0)
    b = records(steps=10, evals=5, loss0=3.0)
    curve = plots.Curve.of([a, b], "val_loss")
    assert list(curve.steps) == [5, 10]
    assert curve.mean.tolist() == pytest.approx([3.5 - 0.125, 3.5 - 0.25])
    assert curve.low.tolist() == pytest.approx([3.0 - 0.125, 3.0 - 0.25])
    assert curve.high.tolist() == pytest.approx([4.0 - 0.125, 4.0 - 0.25])


def test_a_run_whose_curves_cannot_be_drawn_warns_and_still_finishes(tmp_path, capsys):
    from gptx.tracking import NullTracker

    (tmp_path / "metrics.jsonl").write_text("garbage\nmore garbage\n")
    assert plots.log_run_curves(tmp_path, NullTracker()) is None
    err = capsys.readouterr().err
    assert err.startswith("Warning: no loss-curve plot") and "line 1 is not JSON" in err
    assert not (tmp_path / "loss_curves.png").exists()
