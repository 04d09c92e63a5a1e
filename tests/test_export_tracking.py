"""With tracking on, an export of a tracked run lands in that run's MLflow artifacts."""
import pytest
from helpers import gptx, write_experiment

pytestmark = pytest.mark.slow


def test_export_of_a_tracked_run_is_logged_to_it(tmp_path, mlflow_sqlite):
    from mlflow.tracking import MlflowClient

    env = {"MLFLOW_TRACKING_URI": mlflow_sqlite}
    f = write_experiment(tmp_path / "exported.toml")
    p = gptx("run", f, "--set", "tracking.enabled=true", "--set", "training.max_steps=4", "--quiet",
             cwd=tmp_path, env=env, check=True)
    run_id = p.stdout.split("MLflow run: ")[1].split()[0]
    gptx("export", f"runs:/{run_id}", "-o", tmp_path / "onnx", cwd=tmp_path, env=env, check=True)
    names = {a.path for a in MlflowClient(mlflow_sqlite).list_artifacts(run_id, "onnx")}
    assert {"onnx/model.onnx", "onnx/gptx_export.json"} <= names
    # a checkpoint directory of a tracked run knows its run too
    (run_dir,) = (tmp_path / "runs" / "exported").iterdir()
    gptx("export", run_dir, "-o", tmp_path / "onnx2", cwd=tmp_path, env=env, check=True)
    assert (tmp_path / "onnx2" / "model.onnx").is_file()
