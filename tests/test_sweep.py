"""gptx sweep: a grid of variants over one base file, nested MLflow runs, one comparison table."""
import json

import pytest
from helpers import gptx, write_experiment

from gptx.errors import ConfigError
from gptx.sweep import parse_vary


def test_vary_makes_the_cartesian_product():
    vs = parse_vary(["model.positional.kind=learned,rope,alibi", "model.n_layer=1,2"])
    assert len(vs) == 6
    assert vs[0].overrides == ["model.positional.kind=learned", "model.n_layer=1"]
    with pytest.raises(ConfigError):
        parse_vary(["model.positional.kind"])


@pytest.mark.slow
def test_sweep_runs_each_variant_under_one_parent(tmp_path, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    f = write_experiment(tmp_path / "grid.toml")
    p = gptx("sweep", f, "--vary", "model.positional.kind=learned,rope,alibi", "--set", "training.max_steps=6",
             "--set", "training.eval_interval=6", "--set", "tracking.enabled=true", "--set", f"tracking.uri='{mlflow_sqlite}'",
             "--json", "--quiet", cwd=tmp_path, check=True)
    out = json.loads(p.stdout)
    rows = out["variants"]
    assert [r["variant"] for r in rows] == [f"model.positional.kind={k}" for k in ("learned", "rope", "alibi")]
    assert all(r["val_loss"] > 0 and r["tokens_per_sec"] > 0 and r["params"] > 0 for r in rows)
    assert rows[0]["params"] > rows[1]["params"]  # learned positions have a table; rope has none
    client = MlflowClient(mlflow_sqlite)
    for r in rows:
        run = client.get_run(r["run_id"])
        assert run.data.tags["mlflow.parentRunId"] == out["parent_run_id"]
        assert run.data.params["model.positional.kind"] == r["variant"].split("=")[1]
    assert client.get_run(out["parent_run_id"]).info.status == "FINISHED"


@pytest.mark.slow
def test_sweep_with_a_bad_value_trains_nothing(tmp_path):
    f = write_experiment(tmp_path / "grid.toml")
    p = gptx("sweep", f, "--vary", "model.positional.kind=learned,ropee", cwd=tmp_path)
    assert p.returncode == 2 and "did you mean 'rope'" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "runs").exists()
