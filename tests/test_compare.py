"""gptx compare on runs written by the test (run directories and MLflow runs with the results a
trainer leaves): grouping by settings and seed, the statistics, the time-to-target columns,
unfinished and tampered runs, unknown run ids. The sweep's own end-to-end test (real training)
is in test_sweep.py."""
import json
import statistics

import numpy as np
import pytest
from helpers import gptx
from test_stats import p_by_integration

from gptx.tracking import flatten


def config(kind="learned", seed=1337, experiment="e", n_layer=2):
    return {"model": {"n_layer": n_layer, "positional": {"kind": kind} | ({"theta": 10000.0} if kind == "rope" else {})},
            "training": {"seed": seed, "max_steps": 100, "out_dir": "/somewhere"},
            "tracking": {"experiment": experiment, "run_name": f"{kind}-{seed}", "enabled": True}}


def curve(final, steps=100):
    recs = [{"step": s, "seconds": 0.1 * s, "train_loss": final + 2.0 / s, "lr": 1e-3, "tokens_per_sec": 1000.0 + s}
            for s in range(1, steps + 1)]
    recs += [{"step": s, "seconds": 0.1 * s + 0.05, "val_loss": final + 2.0 / s} for s in (25, 50, 75, 100)]
    return recs + [{"step": steps, "seconds": 0.1 * steps + 0.5, "final_val_loss": final}]


def run_dir(root, name, final, status="FINISHED", **cfg_and_results):
    results = {k: cfg_and_results.pop(k) for k in list(cfg_and_results) if k.endswith(("_to_target", "best_val_loss"))}
    d = root / name
    d.mkdir(parents=True)
    info = {"status": status, "experiment": "e", "mlflow_run_id": None, "config": config(**cfg_and_results),
            "final_val_loss": final, "num_params": 1234} | results
    (d / "run.json").write_text(json.dumps(info))
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve(final)))
    return d


LEARNED = [1.91, 1.905, 1.914]
ROPE = [1.88, 1.89, 1.885]


def compare(*args, cwd, check=True):
    p = gptx("compare", *map(str, args), cwd=cwd, check=check)
    return p if not check else (p, json.loads(p.stdout) if "--json" in args else None)


def test_groups_by_differing_settings_and_seed_and_tests_against_the_first(tmp_path):
    runs = [run_dir(tmp_path / "r", f"l{i}", v, seed=1337 + i) for i, v in enumerate(LEARNED)]
    runs += [run_dir(tmp_path / "r", f"r{i}", v, kind="rope", seed=1337 + i) for i, v in enumerate(ROPE)]
    _, out = compare(*runs, "--json", "--out", tmp_path / "out", cwd=tmp_path)
    base, rope = out["variants"]
    assert base["variant"] == "model.positional.kind=learned" and base["base"] and base["n"] == 3
    assert rope["variant"] == "model.positional.kind=rope"  # theta only exists for rope: the kind says it
    assert rope["settings"] == {"model.positional.kind": "rope"}
    assert [r["seed"] for r in rope["runs"]] == [1337, 1338, 1339] and out["seeds"] == [1337, 1338, 1339]
    assert rope["mean"] == pytest.approx(np.mean(ROPE)) and rope["std"] == pytest.approx(np.std(ROPE, ddof=1))
    va, vb = np.var(LEARNED, ddof=1) / 3, np.var(ROPE, ddof=1) / 3
    t = (np.mean(ROPE) - np.mean(LEARNED)) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    assert rope["diff"] == pytest.approx(np.mean(ROPE) - np.mean(LEARNED))
    assert rope["p_value"] == pytest.approx(p_by_integration(t, df), rel=1e-7) and rope["significant"] is True
    assert rope["tokens_per_sec"] == statistics.median([1000.0 + s for s in range(1, 101)] * 3)
    assert rope["wall_seconds"] == pytest.approx(10.5) and rope["params"] == 1234
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["compare.json", "loss_curves.png"]
    assert json.loads((tmp_path / "out" / "compare.json").read_text())["variants"][1]["p_value"] == rope["p_value"]

    p, _ = compare(*runs, "--alpha", "0.001", cwd=tmp_path)  # the table; the default folder under ./runs
    lines = p.stdout.splitlines()
    assert lines[2].startswith("model.positional.kind=rope") and "-0.0247" in lines[2] and " *" not in lines[2]
    assert "(base)" in lines[3] and "1.9097 ± 0.0045" in lines[3]
    (folder,) = (tmp_path / "runs").iterdir()
    assert folder.name.startswith("compare-") and f"folder: {folder}" in p.stdout


def test_time_to_target_columns_appear_when_runs_have_them(tmp_path):
    runs = [run_dir(tmp_path, f"l{i}", v, seed=i, steps_to_target=400 + 10 * i, tokens_to_target=(400 + 10 * i) * 768,
                    seconds_to_target=30.0 + i, best_val_loss=v - 0.01) for i, v in enumerate(LEARNED)]
    runs += [run_dir(tmp_path, "r0", ROPE[0], kind="rope", seed=0, best_val_loss=ROPE[0])]  # never reached it
    p, out = compare(*runs, "--json", "--out", tmp_path / "out", cwd=tmp_path)
    learned, rope = out["variants"]
    assert learned["steps_to_target"] == {"mean": 410.0, "std": 10.0, "runs_with_it": 3}
    assert learned["seconds_to_target"]["mean"] == 31.0 and learned["best_val_loss"]["mean"] == pytest.approx(np.mean(LEARNED) - 0.01)
    assert "steps_to_target" not in rope and rope["best_val_loss"]["runs_with_it"] == 1
    assert rope["n"] == 1 and rope["std"] is None and rope["p_value"] is None  # one seed: no test
    table = compare(*runs, "--out", tmp_path / "out2", cwd=tmp_path)[0].stdout
    head, _, first, second = table.splitlines()[:4]
    assert "steps to target" in head and "tokens to target" in head and "seconds to target" in head
    assert "410 (3/3)" in second and "0.31M (3/3)" in second and "0:31 (3/3)" in second
    assert "use --seeds 3 or more" in table


def test_runs_of_different_experiments_are_separate_groups_named_by_experiment(tmp_path):
    a = run_dir(tmp_path, "a", 1.9, experiment="baseline")
    b = run_dir(tmp_path, "b", 1.8, experiment="modern", n_layer=4)
    _, out = compare(a, b, "--json", "--out", tmp_path / "out", cwd=tmp_path)
    assert [v["variant"] for v in out["variants"]] == ["model.n_layer=2 tracking.experiment=baseline",
                                                       "model.n_layer=4 tracking.experiment=modern"]


def test_mlflow_runs_with_target_metrics_compare_like_run_directories(tmp_path, mlflow_sqlite):
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    exp = client.get_experiment_by_name("compare-test") or client.create_experiment("compare-test")
    exp = exp.experiment_id if hasattr(exp, "experiment_id") else exp
    ids, dirs = [], []
    for i, (kind, value) in enumerate([("learned", v) for v in LEARNED] + [("rope", v) for v in ROPE]):
        run = client.create_run(exp, run_name=f"{kind} seed={i}")
        params = flatten(config(kind=kind, seed=i % 3, experiment="compare-test"))
        client.log_batch(run.info.run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric(k, v, 1_000 + s * 10, s) for s, rec in enumerate(curve(value)) for k, v in rec.items()
                                  if k not in ("step", "seconds")] + [Metric("steps_to_target", 300 + i, 0, 0)])
        client.set_terminated(run.info.run_id, "FINISHED")
        ids.append(run.info.run_id)
        dirs.append(run_dir(tmp_path / "dirs", f"d{i}", value, kind=kind, seed=i % 3, experiment="compare-test",
                            steps_to_target=300 + i))
    _, by_id = compare(*ids[:3], *[f"runs:/{x}" for x in ids[3:]], "--tracking-uri", mlflow_sqlite, "--json",
                       "--out", tmp_path / "o1", cwd=tmp_path)
    _, by_dir = compare(*dirs, "--json", "--out", tmp_path / "o2", cwd=tmp_path)
    for a, b in zip(by_id["variants"], by_dir["variants"]):
        assert a["variant"] == b["variant"]
        for key in ("mean", "std", "ci95", "diff", "p_value", "steps_to_target"):
            assert a[key] == b[key], key
    assert [r["run_id"] for v in by_id["variants"] for r in v["runs"]] == ids


def test_unfinished_runs_are_skipped_in_a_folder_and_refused_by_name(tmp_path):
    folder = tmp_path / "sweep"
    for i, v in enumerate(LEARNED):
        run_dir(folder, f"l{i}", v, seed=i)
    stopped = run_dir(folder, "l9", 1.7, status="KILLED", seed=9)
    p, out = compare(folder, "--json", "--out", tmp_path / "out", cwd=tmp_path)
    assert out["variants"][0]["n"] == 3
    assert p.stderr.strip() == f"Warning: skipped {stopped}: the run has not finished (status 'KILLED')"
    p = compare(stopped, cwd=tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.strip() == f"Error: {stopped}: the run has not finished (status 'KILLED')"


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "metrics.jsonl").write_text('{"step": 1, "seconds": 0.1}\nbroken\n{"step": 2, "seconds": 0.2}\n'),
     "metrics.jsonl: line 2 is not JSON"),
    (lambda d: (d / "run.json").write_text('{"status": "FINI'), "run.json: corrupted"),
    (lambda d: (d / "run.json").write_text("[]"), "run.json: not a gptx run directory"),
    (lambda d: (d / "run.json").write_text('{"status": "FINISHED"}'), "run.json: has no resolved 'config' object"),
    (lambda d: (d / "run.json").write_text(""), "run.json: corrupted"),
])
def test_a_damaged_run_is_one_line_and_creates_nothing(tmp_path, damage, message):
    d = run_dir(tmp_path, "r", 1.9)
    damage(d)
    before = sorted(tmp_path.rglob("*"))
    p = compare(d, cwd=tmp_path, check=False)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and message in p.stderr, p.stderr
    assert sorted(tmp_path.rglob("*")) == before


def test_an_unknown_run_id_in_a_real_store_is_one_line_and_changes_nothing(tmp_path, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)

    def count() -> int:
        return len(client.search_runs([e.experiment_id for e in client.search_experiments()], max_results=50_000))

    before = count()
    p = compare("0123456789abcdef0123456789abcdef", "--tracking-uri", mlflow_sqlite, cwd=tmp_path, check=False)
    assert p.returncode == 2 and p.stderr.strip() == (
        f"Error: 0123456789abcdef0123456789abcdef: no such MLflow run in {mlflow_sqlite}")
    assert list(tmp_path.iterdir()) == []
    assert count() == before


def test_runs_without_a_whole_split_loss_compare_their_last_sampled_val_loss(tmp_path):
    """training.final_eval_tokens = 0: no final_val_loss; the table says what it compares instead."""
    runs = []
    for i, v in enumerate(LEARNED):
        d = run_dir(tmp_path, f"l{i}", v, seed=i)
        info = json.loads((d / "run.json").read_text())
        del info["final_val_loss"]
        (d / "run.json").write_text(json.dumps(info))
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in curve(v) if "final_val_loss" not in r))
        runs.append(d)
    p, out = compare(*runs, "--json", "--out", tmp_path / "out", cwd=tmp_path)
    assert out["metric"] == "val_loss" and out["variants"][0]["mean"] == pytest.approx(np.mean(LEARNED) + 0.02)
    assert [r["val_loss"] for r in out["variants"][0]["runs"]] == pytest.approx([v + 0.02 for v in LEARNED])
    table = compare(*runs, "--out", tmp_path / "out2", cwd=tmp_path)[0].stdout
    assert "val loss (sampled)" in table.splitlines()[0] and "final_eval_tokens = 0" in table
