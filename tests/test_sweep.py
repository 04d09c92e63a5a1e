"""gptx sweep: a grid of variants × seeds over one base file, nested MLflow runs, one comparison
(mean ± std, 95% CI, Welch's p against the base), loss-curve PNGs, and gptx compare agreeing."""
import json
import statistics

import numpy as np
import pytest
from helpers import gptx, write_experiment
from test_stats import p_by_integration

from gptx.errors import ConfigError
from gptx.sweep import parse_vary

SEEDS = [1337, 1338, 1339]
T_975_2 = 4.302653  # Student t quantile, 2 degrees of freedom (printed tables)


def test_vary_makes_the_cartesian_product():
    vs = parse_vary(["model.positional.kind=learned,rope,alibi", "model.n_layer=1,2"])
    assert len(vs) == 6
    assert vs[0].overrides == ["model.positional.kind=learned", "model.n_layer=1"]
    assert vs[0].settings == {"model.positional.kind": "learned", "model.n_layer": "1"}
    with pytest.raises(ConfigError):
        parse_vary(["model.positional.kind"])


def sweep_args(f, uri, seeds=3):
    return ["sweep", f, "--vary", "model.positional.kind=learned,rope", "--seeds", str(seeds),
            "--set", "training.max_steps=8", "--set", "training.eval_interval=4", "--set", "training.log_interval=2",
            "--set", "training.final_eval_tokens=4096", "--set", "training.sample_tokens=0",
            "--set", "tracking.enabled=true", "--set", f"tracking.uri='{uri}'", "--quiet"]


@pytest.fixture(scope="module")
def swept(tmp_path_factory, mlflow_sqlite):
    """One real sweep: 2 variants × 3 seeds of the tiny char model, tracked in the sqlite store."""
    d = tmp_path_factory.mktemp("sweep")
    f = write_experiment(d / "grid.toml")
    p = gptx(*sweep_args(f, mlflow_sqlite), "--json", cwd=d, check=True)
    return type("Swept", (), {"dir": d, "file": f, "out": json.loads(p.stdout)})


def child_runs(client, parent_id):
    parent = client.get_run(parent_id)
    return client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")


@pytest.mark.slow
def test_sweep_statistics_match_the_per_seed_values_in_mlflow(swept, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    out = swept.out
    children = child_runs(client, out["parent_run_id"])
    assert sorted(c.info.run_name for c in children) == sorted(
        f"model.positional.kind={k} seed={s}" for k in ("learned", "rope") for s in SEEDS)
    assert client.get_run(out["parent_run_id"]).info.status == "FINISHED"
    values = {}
    for v in out["variants"]:
        kind = v["settings"]["model.positional.kind"]
        assert v["variant"] == f"model.positional.kind={kind}" and v["n"] == 3
        assert [r["seed"] for r in v["runs"]] == SEEDS  # the same seeds for every variant
        runs = [client.get_run(r["run_id"]) for r in v["runs"]]
        assert [int(r.data.params["training.seed"]) for r in runs] == SEEDS
        assert all(r.data.tags["mlflow.parentRunId"] == out["parent_run_id"] for r in runs)
        x = np.array([r.data.metrics["final_val_loss"] for r in runs])
        values[kind] = x
        assert [r["final_val_loss"] for r in v["runs"]] == x.tolist()
        assert v["mean"] == pytest.approx(x.mean(), rel=1e-12) and v["std"] == pytest.approx(x.std(ddof=1), rel=1e-12)
        half = T_975_2 * x.std(ddof=1) / np.sqrt(3)
        assert v["ci95"] == pytest.approx([x.mean() - half, x.mean() + half], abs=1e-6)
    base, rope = out["variants"]
    assert base["base"] and base["diff"] is None and base["p_value"] is None
    a, b = values["learned"], values["rope"]
    va, vb = a.var(ddof=1) / 3, b.var(ddof=1) / 3
    t = (b.mean() - a.mean()) / np.sqrt(va + vb)
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 2)
    assert rope["diff"] == pytest.approx(b.mean() - a.mean(), rel=1e-12)
    assert rope["p_value"] == pytest.approx(p_by_integration(t, df), rel=1e-7)
    assert rope["significant"] == (rope["p_value"] < 0.05)
    assert 0 < a.std() and not np.array_equal(a, b)  # seeds and variants really differ


@pytest.mark.slow
def test_sweep_writes_its_folder_and_logs_pngs_to_mlflow(swept, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_sqlite)
    folder = swept.dir / "runs" / "grid" / swept.out["folder"].split("/")[-1]
    assert str(folder) == swept.out["folder"] and folder.name.startswith("sweep-")
    assert json.loads((folder / "sweep.json").read_text())["variants"] == swept.out["variants"]
    png = folder / "loss_curves.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and 10_000 < png.stat().st_size < 150_000
    assert swept.out["plots"] == [str(png)]
    assert {a.path for a in client.list_artifacts(swept.out["parent_run_id"])} >= {"loss_curves.png", "sweep.json", "table.txt"}
    dirs = {r["run_dir"] for v in swept.out["variants"] for r in v["runs"]}
    assert len(dirs) == 6 and all(d.startswith(str(folder) + "/") for d in dirs)  # one new directory each
    for v in swept.out["variants"]:
        for r in v["runs"]:
            assert (folder / r["run_dir"]).joinpath("loss_curves.png").is_file()  # gptx run's own plot
            names = {a.path for a in client.list_artifacts(r["run_id"])}
            assert {"loss_curves.png", "metrics.jsonl", "checkpoint"} <= names


@pytest.mark.slow
def test_tokens_per_sec_is_the_median_of_the_per_step_rates_the_progress_lines_show(swept):
    from gptx.metrics_log import read

    for v in swept.out["variants"]:
        per_step = [rec["tokens_per_sec"] for r in v["runs"] for rec in read(f"{r['run_dir']}/metrics.jsonl")
                    if "tokens_per_sec" in rec]
        assert len(per_step) == 3 * 8
        assert v["tokens_per_sec"] == statistics.median(per_step)
        walls = [max(rec["seconds"] for rec in read(f"{r['run_dir']}/metrics.jsonl")) for r in v["runs"]]
        assert v["wall_seconds"] == statistics.median(walls)


@pytest.mark.slow
def test_compare_gives_the_sweeps_numbers_from_the_folder_the_parent_run_or_the_run_ids(swept, mlflow_sqlite):
    keys = ("variant", "n", "mean", "std", "ci95", "diff", "p_value", "tokens_per_sec", "wall_seconds")
    expected = [{k: v[k] for k in keys} for v in swept.out["variants"]]
    ids = [r["run_id"] for v in swept.out["variants"] for r in v["runs"]]
    dirs = [r["run_dir"] for v in swept.out["variants"] for r in v["runs"]]
    for i, names in enumerate([[swept.out["folder"]], [swept.out["parent_run_id"]], [*dirs[:2], *ids[2:4], *(f"runs:/{x}" for x in ids[4:])]]):
        p = gptx("compare", *names, "--tracking-uri", mlflow_sqlite, "--json", "--out", swept.dir / f"compare{i}",
                 cwd=swept.dir, check=True)
        got = json.loads(p.stdout)
        assert [{k: v[k] for k in keys} for v in got["variants"]] == expected, names
        assert (swept.dir / f"compare{i}" / "loss_curves.png").is_file()


@pytest.mark.slow
def test_a_rerun_never_touches_the_previous_sweeps_runs(swept, mlflow_sqlite):
    """Issue 18: reruns used to reuse run directories named after each variant and repoint their
    run.json to the new MLflow runs."""
    first = {p: p.read_bytes() for p in (swept.dir / "runs").rglob("*") if p.is_file()}
    p = gptx(*sweep_args(swept.file, mlflow_sqlite, seeds=1), cwd=swept.dir, check=True)
    assert {p: p.read_bytes() for p in first} == first  # every file of the first sweep, byte for byte
    folders = sorted((swept.dir / "runs" / "grid").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("sweep-") for f in folders)
    lines = p.stdout.splitlines()
    assert lines[0].split()[:7] == ["variant", "n", "final", "val", "loss", "95%", "CI"]
    assert "tok/s (median step)" in lines[0] and any("(base)" in line for line in lines[2:4])
    assert "one seed gives no spread and no test" in p.stdout


@pytest.mark.slow
def test_sweep_with_a_bad_value_trains_nothing(tmp_path):
    f = write_experiment(tmp_path / "grid.toml")
    p = gptx("sweep", f, "--vary", "model.positional.kind=learned,ropee", cwd=tmp_path)
    assert p.returncode == 2 and "did you mean 'rope'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists()
