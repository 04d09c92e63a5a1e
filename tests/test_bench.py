"""gptx bench: the command runs on tiny settings and reports every field with sane values.
No timing thresholds: speed targets are ratios measured on a quiet machine, not unit tests."""
import json
import os
from pathlib import Path

import pytest
from helpers import gptx, missing_tool, node_example_modules, write_experiment

# peak RSS is measured where the process may reset its high-water mark (Linux), else reported as None
PEAK_RSS = os.access("/proc/self/clear_refs", os.W_OK)


def test_bench_json_has_every_section_and_sane_values(tmp_path):
    exp = write_experiment(tmp_path / "e.toml")
    proc = gptx("bench", "--json", "--experiment", exp, "--train-steps", "2", "--warmup-steps", "1",
                "--peak-seconds", "0.05", "--model", "tiny", "--backends", "torch,ort,ort-int8,hf,genai",
                "--prompt-tokens", "4", "--new-tokens", "3", "--repeats", "1", check=True, timeout=900)
    r = json.loads(proc.stdout)
    assert r["machine"]["cores"] >= 1 and r["machine"]["threads"] >= 1
    for dt in ("float32", "bfloat16"):  # measured on the device the train section trains on
        assert r["peak"][dt]["gflops"] > 0 and r["peak"][dt]["n"] >= 256 and r["peak"][dt]["device"] == "cpu"
    assert r["memory_bandwidth"]["gbps"] > 0
    t = r["train"]
    assert t["steps"] == 2 and t["tokens_per_step"] == 4 * 32
    floor = t["gemm_floor"]  # every Linear runs 3 products a step: forward, input grad, weight grad
    assert floor["gemms"] == 3 * (4 * 2 + 1)  # 4 per block x 2 blocks + the (tied) LM head
    assert floor["gflop"] == pytest.approx(6 * 128 * (2 * 12 * 32 * 32 + 65 * 32) / 1e9, rel=1e-4)
    assert floor["ms"] > 0 and 0 < floor["share_of_step"] < 1 < floor["max_speedup"]  # a tiny model: mostly overhead
    assert t["tokens_per_s"] > 0 and t["step_ms_median"] > 0
    assert t["minor_page_faults_per_step"] >= 0  # Linux: getrusage is there
    assert t["flops_per_token"] > 6 * 20_000  # 2 layers x 32 wide: ~25k non-embedding parameters
    assert 0 < t["mfu"] < 1.5 and t["mfu_peak"] == "float32"
    assert t["loss_first"] == pytest.approx(4.17, abs=0.3)  # ln(65): a char vocabulary at random init
    g = r["generate"]
    assert g["prompt_tokens"] == 4 and g["new_tokens"] == 3 and g["batch"] == 1
    assert 7_000_000 < g["parameters"] < 8_000_000  # tiny: 4 x 128 with GPT-2's 50257-token vocabulary
    assert g["fp32_weights_mib"] == pytest.approx(g["parameters"] * 4 / 2**20, abs=0.1)
    assert g["fp32_bandwidth_bound_tok_s"] == pytest.approx(
        r["memory_bandwidth"]["gbps"] * 1e9 / (g["parameters"] * 4), rel=0.01)
    # every backend asked for ran: transformers and onnxruntime-genai are test dependencies
    assert g["skipped"] == {} and set(g["backends"]) == {"torch", "ort", "ort-int8", "hf", "genai"}
    for name, b in g["backends"].items():
        assert b["tokens_per_s"] > 0 and b["ttft_ms"] > 0 and b["total_s"] > 0, name
        rss = b["peak_rss_mib"]
        assert (rss is not None and rss >= 0) if PEAK_RSS else rss is None, name
        assert b["vs_hf"] == pytest.approx(b["tokens_per_s"] / g["backends"]["hf"]["tokens_per_s"], abs=0.006), name  # rounded to 2 places
    # the runtimes that must decode torch's greedy tokens do (int8 may differ: it reports how many agree)
    for name in ("ort", "hf", "genai"):
        assert g["backends"][name]["same_tokens_as_torch"] == 3, name
    assert 0 <= g["backends"]["ort-int8"]["same_tokens_as_torch"] <= 3
    assert g["hf_logits_max_abs_diff"] < 1e-3


def test_bench_table_and_sections(tmp_path):
    exp = write_experiment(tmp_path / "e.toml")
    proc = gptx("bench", "--only", "train", "--experiment", exp, "--train-steps", "1", "--warmup-steps", "0",
                "--set", "training.batch_size=2", check=True)
    assert "tokens/s" in proc.stdout and "MFU" in proc.stdout and "generation" not in proc.stdout
    assert "matmul peak" not in proc.stdout  # measured for MFU, shown only with --only peak
    bad = gptx("bench", "--only", "trian")
    assert bad.returncode == 2 and "Error: --only: unknown section trian" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_mfu_only_against_a_peak_measured_on_the_device_that_trained(tmp_path):
    """A GPU's step divided by a CPU's peak (or the reverse) is not a utilization: no MFU then."""
    from gptx.bench import bench_train, train_device

    exp = write_experiment(tmp_path / "e.toml")
    assert train_device(exp, ("training.device=cpu",)) == "cpu"
    peak = {"float32": {"dtype": "float32", "n": 256, "gflops": 100.0, "repeats": 3, "device": "cpu"}}
    here = bench_train(exp, ("training.batch_size=2",), steps=1, warmup=0, peak=peak)
    assert here["device"] == "cpu" and here["mfu"] == pytest.approx(here["model_gflops"] / 100.0, abs=1e-4)
    peak["float32"]["device"] = "cuda"
    elsewhere = bench_train(exp, ("training.batch_size=2",), steps=1, warmup=0, peak=peak)
    assert elsewhere["mfu"] is None and elsewhere["mfu_peak"] is None


def test_bench_int4_row():
    proc = gptx("bench", "--only", "generate", "--backends", "ort-int4", "--model", "tiny", "--new-tokens", "8",
                "--repeats", "1", "--json", check=True, timeout=900)
    g = json.loads(proc.stdout)["generate"]
    assert set(g["backends"]) == {"ort-int4"} and g["skipped"] == {}
    row = g["backends"]["ort-int4"]
    assert row["tokens_per_s"] > 0 and row["ttft_ms"] > 0 and row["total_s"] > 0
    assert row["same_tokens_as_torch"] is None and row["vs_hf"] is None  # no torch or HF row to compare with
    assert g["fp32_bandwidth_bound_tok_s"] > 0 and g["new_tokens"] == 8
    # each precision exported (int4 is quantized from the fp32 export) has its bound
    assert set(g["bounds"]) == {"fp32", "int4"}
    fp32, int4 = g["bounds"]["fp32"], g["bounds"]["int4"]
    assert 4 * 0.9 * g["parameters"] < fp32["bytes_per_token"] < 4 * g["parameters"]  # less the position table, a row
    assert fp32["bytes_per_token"] / 8 < int4["bytes_per_token"] < fp32["bytes_per_token"] / 6  # 4 bits + a scale per block
    assert int4["bound_tok_s"] > fp32["bound_tok_s"] > 0
    assert row["bound_tok_s"] == int4["bound_tok_s"]
    assert row["share_of_bound"] == pytest.approx(row["decode_tokens_per_s"] / int4["bound_tok_s"], abs=0.001)
    # quality beside speed: gptx eval's perplexity of both exports on the shipped Shakespeare's tail
    q = g["quality"]
    assert q["random_weights"] is True and "random-init" in q["note"] and q["tokens"] > 1000
    for scheme in ("fp32", "int4"):  # random weights: near the vocabulary size
        assert 10_000 < q[scheme]["perplexity"] < 200_000 and q[scheme]["loss"] > 9, scheme
    assert "vs_fp32_pct" not in q["fp32"] and abs(q["int4"]["vs_fp32_pct"]) < 10


def test_deploy_table_is_written_from_a_saved_bench_json(tmp_path):
    """gptx bench --deploy-table FILE: the deployment docs' table from a saved --json output, one
    row per runtime x precision measured, measuring nothing itself; a file that is not one is a
    line naming it."""
    saved = tmp_path / "bench.json"
    saved.write_text(gptx("bench", "--only", "generate", "--backends", "torch,ort,ort-int4", "--model", "tiny",
                          "--new-tokens", "4", "--repeats", "1", "--json", check=True, timeout=900).stdout)
    g = json.loads(saved.read_text())["generate"]
    table = gptx("bench", "--deploy-table", saved, check=True).stdout.splitlines()
    rows = {line.split(" | ")[0].lstrip("| ") + "/" + line.split(" | ")[1]: line.split(" | ") for line in table
            if line.startswith("| ") and not line.startswith("| runtime")}
    assert set(rows) == {"PyTorch (gptx generate)/fp32", "onnxruntime, Python loop/fp32", "onnxruntime, Python loop/int4"}
    int4, loop = rows["onnxruntime, Python loop/int4"], g["backends"]["ort-int4"]
    assert int4[2] == f"{loop['tokens_per_s']:,.1f}" and int4[3] == f"{loop['ttft_ms']:.1f}"
    assert int4[5] == f"{loop['share_of_bound']:.0%}" and int4[6] == "-"  # the loop is its own reference
    assert int4[7] == f"{loop['same_tokens_as_torch']} of 4" and int4[8].strip(" |") == "random weights"
    assert rows["PyTorch (gptx generate)/fp32"][7] == "4 of 4"
    bad_files = {"missing.json": None, "notjson.json": "{", "nogen.json": '{"machine": {}}',
                 "ttft.json": '{"generate": {"backends": {"ort": {"tokens_per_s": 3, "ttft_ms": "x"}}}}',
                 "quality.json": '{"generate": {"backends": {"ort": {"tokens_per_s": 3}}, "quality": [1]}}'}
    for bad, said in (("missing.json", "no such file"), ("notjson.json", "not JSON"), ("nogen.json", "no generate section"),
                      ("ttft.json", "generate.backends.ort.ttft_ms: not a number"), ("quality.json", "generate.quality: not an object")):
        if bad_files[bad] is not None:
            (tmp_path / bad).write_text(bad_files[bad])
        proc = gptx("bench", "--deploy-table", tmp_path / bad)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"Error: --deploy-table: {tmp_path / bad}: {said}"), lines


@pytest.mark.slow
def test_bench_genai_and_node_rows_against_the_python_loop(request, tmp_path_factory):
    """genai on the fp32 and int4 exports and the Node example (timed inside Node) each report
    their speed against gptx's Python loop on the same file, and decode its greedy ids."""
    modules = node_example_modules(request, tmp_path_factory)
    proc = gptx("bench", "--only", "generate", "--backends", "torch,ort,ort-int4,genai,genai-int4,node", "--model", "tiny",
                "--prompt-tokens", "4", "--new-tokens", "8", "--repeats", "1", "--json",
                env={"NODE_PATH": str(modules)}, check=True, timeout=900)
    g = json.loads(proc.stdout)["generate"]
    assert g["skipped"] == {}
    rows = g["backends"]
    for name, loop in (("genai", "ort"), ("genai-int4", "ort-int4"), ("node", "ort")):
        row = rows[name]
        assert row["tokens_per_s"] > 0 and row["ttft_ms"] > 0 and row["total_s"] > 0 and row["load_s"] >= 0, name
        assert row["peak_rss_mib"] is None or row["peak_rss_mib"] >= 0, name
        assert row["loop"] == loop and row["vs_loop"] == pytest.approx(row["tokens_per_s"] / rows[loop]["tokens_per_s"], abs=0.006)
    assert rows["genai"]["same_tokens_as_torch"] == rows["node"]["same_tokens_as_torch"] == 8
    assert rows["genai-int4"]["same_tokens_as_torch"] == rows["ort-int4"]["same_tokens_as_torch"]  # the same int4 graph
    assert "vs_loop" not in rows["ort"] and "vs_loop" not in rows["torch"]


def test_bench_node_without_node_is_skipped_with_its_reason():
    """No node on PATH: the row is skipped, saying why, and the other backends still run."""
    import sys

    proc = gptx("bench", "--only", "generate", "--backends", "node", "--model", "tiny", "--new-tokens", "2",
                "--repeats", "1", "--json", env={"PATH": os.path.dirname(sys.executable)}, check=True, timeout=600)
    g = json.loads(proc.stdout)["generate"]
    assert g["backends"] == {} and g["skipped"] == {"node": "Node.js (node) is not installed"}


@pytest.mark.slow
def test_bench_node_without_its_packages_says_how_to_install_them(tmp_path):
    """node is there but onnxruntime-node is not (no NODE_PATH, none beside the script): one line
    that names the install command."""
    import shutil
    from importlib import resources

    if shutil.which("node") is None:
        missing_tool("Node.js (node) is not installed")
    if (Path(str(resources.files("gptx.export") / "node")) / "node_modules").exists():
        pytest.skip("export/node/node_modules is installed here: Node finds the packages beside the script")
    env = {"NODE_PATH": str(tmp_path)}  # an empty folder
    proc = gptx("bench", "--only", "generate", "--backends", "node", "--model", "tiny", "--new-tokens", "2",
                "--repeats", "1", "--json", env=env, check=True, timeout=600)
    reason = json.loads(proc.stdout)["generate"]["skipped"]["node"]
    assert reason.startswith("onnxruntime-node is not installed: ONNXRUNTIME_NODE_INSTALL=skip npm install"), reason


@pytest.mark.slow
def test_bench_speedrun_times_both_recipes_as_whole_processes():
    """The section's plumbing on 3 steps per recipe (the comparison itself runs each recipe's own
    steps: minutes, measured for the README)."""
    proc = gptx("bench", "--only", "speedrun", "--speedrun-steps", "3", "--speedrun-seeds", "1", "--json",
                check=True, timeout=900)
    s = json.loads(proc.stdout)["speedrun"]
    assert s["target_val_loss"] == 1.90 and s["steps"] == 3 and s["store_creation_s"] > 0
    (row,) = s["runs"]
    assert row["seed"] == 1337
    for recipe in ("nanogpt_recipe", "speedrun"):
        assert row[recipe]["wall_s"] > 0 and 3.0 < row[recipe]["final_val_loss"] < 4.5  # 3 steps: near ln(65)
        assert row[recipe]["reached"] is False
    assert row["ratio"] == pytest.approx(row["speedrun"]["wall_s"] / row["nanogpt_recipe"]["wall_s"], abs=1e-3)
    assert s["mean"]["ratio"] == row["ratio"] and s["mean"]["speedrun_reaches_target"] is False
    assert s["seed_ceiling"] == 1.92 and s["mean"]["speedrun_worst_seed"] == row["speedrun"]["final_val_loss"]


@pytest.mark.slow
def test_bench_speedrun_set_changes_the_speedrun_recipe_alone():
    """--speedrun-set (an ablation's row) reaches the speedrun's process and not the nanoGPT
    recipe's: without its final whole-split evaluation the speedrun has no loss to report."""
    proc = gptx("bench", "--only", "speedrun", "--speedrun-steps", "2", "--speedrun-seeds", "1", "--json",
                "--speedrun-set", "training.final_eval_tokens=0", check=True, timeout=900)
    s = json.loads(proc.stdout)["speedrun"]
    assert s["overrides"] == ["training.final_eval_tokens=0"]
    (row,) = s["runs"]
    assert row["speedrun"]["final_val_loss"] is None and row["nanogpt_recipe"]["final_val_loss"] > 3.0
    assert s["mean"]["speedrun_reaches_target"] is False and s["mean"]["speedrun_worst_seed"] is None


@pytest.mark.slow
def test_bench_startup_reports_the_runs_own_startup_and_import_torch_for_scale():
    """Whole ``gptx run`` processes of speedrun_char.toml, tracked: every field, no thresholds."""
    proc = gptx("bench", "--only", "startup", "--repeats", "2", "--json", check=True, timeout=900)
    s = json.loads(proc.stdout)["startup"]
    assert s["experiment"] == "speedrun_char.toml" and s["steps"] == 2 and s["repeats"] == 2 and s["tracking"] == "sqlite"
    assert len(s["startup_runs_s"]) == len(s["import_torch_runs_s"]) == 2
    assert all(x > 0 for x in s["startup_runs_s"] + s["import_torch_runs_s"])
    assert min(s["startup_runs_s"]) <= s["startup_s"] <= max(s["startup_runs_s"])
    assert min(s["import_torch_runs_s"]) <= s["import_torch_s"] <= max(s["import_torch_runs_s"])
    table = gptx("bench", "--only", "startup", "--repeats", "1", check=True, timeout=900).stdout
    assert "start-up: gptx run speedrun_char.toml (tracked) to its first step done:" in table and "import torch" in table


def _graph(path, nodes, inits):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [1])],
                              [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes], inits)
    onnx.save(helper.make_model(graph), str(path))
    return path


def test_decode_step_bytes_against_a_hand_count(tmp_path):
    """Weights by their stored dtype; a table only gathered counts one row per Gather; a table
    also read whole (the tied head's Transpose) counts whole, once."""
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from gptx.bench import decode_step_bytes

    f32 = lambda name, *shape: numpy_helper.from_array(np.zeros(shape, np.float32), name)  # noqa: E731
    tied, positions, w = f32("tied", 50, 8), f32("positions", 16, 8), f32("w", 8, 8)
    codes = numpy_helper.from_array(np.zeros((50, 4), np.uint8), "codes")  # [V, C/2]: 4-bit table, packed
    scales = f32("scales", 50, 1)  # one scale per row block
    nibbles = helper.make_tensor("nibbles", TensorProto.UINT4, [6, 3], [0] * 18)  # 18 values: 9 bytes
    nodes = [helper.make_node("Gather", ["tied", "ids"], ["x"]),
             helper.make_node("Gather", ["positions", "ids"], ["p"]),
             helper.make_node("Transpose", ["tied"], ["head"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w"], ["y"]),
             helper.make_node("GatherBlockQuantized", ["codes", "ids", "scales"], ["e"], domain="com.microsoft",
                              gather_axis=0, quantize_axis=1, block_size=16),
             helper.make_node("Identity", ["nibbles"], ["n"])]
    got = decode_step_bytes(_graph(tmp_path / "g.onnx", nodes, [tied, positions, w, codes, scales, nibbles]))
    assert got == 50 * 8 * 4 + 8 * 4 + 8 * 8 * 4 + 4 + 4 + 9
    # a row of the tied table alone when nothing else reads it
    alone = decode_step_bytes(_graph(tmp_path / "h.onnx", nodes[:1], [tied]))
    assert alone == 8 * 4


def test_decode_step_bytes_of_a_tiny_export(tmp_path):
    """fp32: every parameter at 4 bytes except the position table, of which one row; the graph's
    few shape constants on top. Every parameter is made distinct first: the exporter stores equal
    tensors (fresh LayerNorm gains, zero biases) once, and a step then reads them once."""
    import torch
    from helpers import tiny_model

    from gptx import checkpoint
    from gptx.bench import decode_step_bytes
    from gptx.export.onnx_export import export_checkpoint

    model, cfg, tok = tiny_model(block_size=32)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ck = checkpoint.save(tmp_path / "run", 1, model, cfg, tok)
    export_checkpoint(ck, tmp_path / "export", log=lambda _msg: None, track=False)
    C = cfg.model.n_embd
    expected = 4 * (model.num_params() - 32 * C + C)
    assert expected <= decode_step_bytes(tmp_path / "export" / "model.onnx") < expected + 1024


@pytest.mark.slow
def test_bench_web_row_decodes_torchs_ids_in_headless_chromium(web_cache):
    """gptx web's page in a real headless Chromium, served from the bench process: greedy from the
    same prompt ids as every backend, exactly --new-tokens of them, and the page's own stats."""
    proc = gptx("bench", "--only", "generate", "--model", "tiny", "--backends", "torch,ort,web", "--prompt-tokens", "4",
                "--new-tokens", "8", "--repeats", "1", "--json", env={"GPTX_CACHE_DIR": str(web_cache)}, check=True, timeout=900)
    g = json.loads(proc.stdout)["generate"]
    assert g["skipped"] == {} and set(g["backends"]) == {"torch", "ort", "web"}
    web = g["backends"]["web"]
    assert web["same_tokens_as_torch"] == 8  # the page decoded past end-of-text too (stop_at_eot=0), as the others
    assert web["page"] == {"backend": "wasm", "threads": g["threads"], "cross_origin_isolated": True, "proxy": False}
    for key in ("tokens_per_s", "decode_tokens_per_s", "ttft_ms", "total_s", "load_s", "first_tokens_per_s", "vs_ort_paired"):
        assert web[key] > 0, key
    assert 2 <= web["warmup_runs"] <= 6 and web["peak_rss_mib"] is None
    assert web["loop"] == "ort" and web["vs_loop"] == pytest.approx(web["tokens_per_s"] / g["backends"]["ort"]["tokens_per_s"], abs=0.006)
    table = gptx("bench", "--only", "generate", "--model", "tiny", "--backends", "web", "--prompt-tokens", "4",
                 "--new-tokens", "2", "--repeats", "1", env={"GPTX_CACHE_DIR": str(web_cache)}, check=True, timeout=900).stdout
    assert "web: gptx web's page in headless Chromium (wasm, " in table and "cross-origin isolated" in table


def test_bench_web_row_says_why_it_is_skipped(tmp_path):
    """No Chromium where $GPTX_CHROMIUM points, or no JavaScript packages in gptx's cache: the row is
    skipped with the fix, and the bench goes on."""
    from gptx.export import browser, server

    args = ("bench", "--only", "generate", "--model", "tiny", "--backends", "web", "--new-tokens", "2", "--repeats", "1", "--json")
    missing = tmp_path / "no-chromium"
    no_browser = gptx(*args, env={"GPTX_CHROMIUM": str(missing)}, check=True)
    assert json.loads(no_browser.stdout)["generate"]["skipped"] == {
        "web": f"no Chromium at {missing} (install it, e.g. apt-get install chromium, or set GPTX_CHROMIUM to its path)"}
    if not browser.chromium().is_file() or server.usable(server.WEB_DIR / server.NODE_MODULES):
        return  # the packages' reason shows only with a Chromium and no node_modules in the web folder
    no_packages = gptx(*args, env={"GPTX_CACHE_DIR": str(tmp_path / "empty-cache")}, check=True)
    assert json.loads(no_packages.stdout)["generate"]["skipped"] == {
        "web": "the page's JavaScript packages are not installed (run gptx web --install)"}


@pytest.mark.slow
def test_bench_web_with_a_chromium_that_does_not_start_is_one_line(web_cache):
    proc = gptx("bench", "--only", "generate", "--model", "tiny", "--backends", "web", "--new-tokens", "2", "--repeats", "1",
                env={"GPTX_CHROMIUM": "/bin/true", "GPTX_CACHE_DIR": str(web_cache)}, timeout=900)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("Error: /bin/true: headless Chromium failed: ")
