"""gptx bench: the command runs on tiny settings and reports every field with sane values.
No timing thresholds: speed targets are ratios measured on a quiet machine, not unit tests."""
import json
import os

import pytest
from helpers import gptx, write_experiment

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
    assert web["vs_ort"] == pytest.approx(web["tokens_per_s"] / g["backends"]["ort"]["tokens_per_s"], abs=0.006)
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
