"""The web page in a real headless Chromium (Playwright), served by a real ``gptx web`` process with
the JavaScript packages ``gptx web --install`` fetched from the npm registry: its greedy tokens
equal gptx's Python onnxruntime generator, tokenizers included, and it streams, samples, stops at
end-of-text and reports bad settings."""
from pathlib import Path
from urllib.parse import urlencode

import pytest

from gptx.export.runtime import OnnxGenerator
from gptx.sampling import Sampler
from helpers import once, serve, wandering_export

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("browser")]

# Unicode, <|endoftext|> written in the text, U+0085 / U+FEFF (where JavaScript's \s and tiktoken's differ)
GPT2_PROMPTS = ["Hello world, it's a test", "Ünïcödé and <|endoftext|> too 日本語 🙂", "x", "  tabs\tand\u0085next\ufeff'll  "]
BYTE_PROMPTS = ["To be, or not to be", "Ünïcödé 🙂 日本語"]
STOP_PROMPT = "The end is near"
# Session-scoped fixtures: pytest-xdist interleaves other modules' tests with these, and module-scoped
# ones would be torn down and built again (a server, a browser) at every switch. The browser, the
# page and the installed packages (web_cache) are conftest.py's: one Playwright per worker.
DONE = "window.gptx && ['done', 'error'].includes(window.gptx.status) && (window.gptx.result || window.gptx.error)"


@pytest.fixture(scope="session")
def gpt2_site(tmp_path_factory, web_cache):
    out = once("gpt2-4-stop", lambda: wandering_export(tmp_path_factory.mktemp("gpt2"), "gpt2", seed=4, stop_prompt=STOP_PROMPT))
    yield from serve(out, web_cache)


@pytest.fixture(scope="session")
def byte_site(tmp_path_factory, web_cache):
    yield from serve(once("byte-6", lambda: wandering_export(tmp_path_factory.mktemp("byte"), "byte", seed=6)), web_cache)


@pytest.fixture(scope="session")
def int8_site(tmp_path_factory, web_cache):
    out = once("byte-7-int8", lambda: wandering_export(tmp_path_factory.mktemp("int8"), "byte", seed=7,
                                                       attention={"kind": "causal", "kv_cache": "int8"}))
    yield from serve(out, web_cache)


def site_dir(site) -> Path:
    return Path(site.banner.split("serving ")[1].split(" at ")[0])


def python_greedy(out: Path, prompts, n: int):
    gen = OnnxGenerator(out)
    return gen, [gen.generate([gen.tokenizer.encode(p)], n, Sampler(temperature=0)).ids[0] for p in prompts]


def state(page) -> dict:
    page.wait_for_function(DONE, timeout=60_000)
    s = page.evaluate("({status: gptx.status, error: gptx.error, result: gptx.result, stats: gptx.stats})")
    return s


def open_page(page, site, **query) -> dict:
    page.goto(site.url + ("?" + urlencode(query) if query else ""))
    if not query.get("prompt"):
        page.wait_for_function("window.gptx && ['ready', 'error'].includes(window.gptx.status)", timeout=60_000)
        return page.evaluate("({status: gptx.status, error: gptx.error})")
    return state(page)


def submit_form(page, prompt: str, **fields) -> dict:
    page.evaluate("gptx.result = null; gptx.error = null")
    page.fill("#prompt", prompt)
    for name, value in fields.items():
        page.fill(f"input[name={name}]", str(value))
    page.click("#go")
    return state(page)


def test_page_generates_pythons_greedy_tokens_with_gpt2_bpe(page, gpt2_site, tmp_path):
    gen, want = python_greedy(site_dir(gpt2_site), GPT2_PROMPTS, 16)
    assert len({t for ids in want for t in ids}) > 16, "the model repeats itself: a weak comparison"
    first = open_page(page, gpt2_site, prompt=GPT2_PROMPTS[0], max_new_tokens=16, temperature=0)  # from the URL query
    rows = [first] + [submit_form(page, p, max_new_tokens=16, temperature=0) for p in GPT2_PROMPTS[1:]]  # from the form
    for prompt, expected, row in zip(GPT2_PROMPTS, want, rows):
        assert row["status"] == "done", row["error"]
        assert row["result"]["prompt_ids"] == gen.tokenizer.encode(prompt), prompt  # @huggingface/tokenizers = tiktoken
        assert row["result"]["ids"] == expected, prompt
        assert row["result"]["text"] == gen.tokenizer.decode(expected)
    # the page runs on WebGPU where the browser has an adapter (headless Chromium usually has none), else wasm
    has_adapter = page.evaluate("async () => Boolean(navigator.gpu && await navigator.gpu.requestAdapter())")
    assert rows[0]["stats"]["backend"] == ("webgpu" if has_adapter else "wasm") and rows[0]["stats"]["new_tokens"] == 16
    assert page.inner_text("#out-new") == gen.tokenizer.decode(want[-1])  # the text on the page
    page.screenshot(path=tmp_path / "page.png")
    assert (tmp_path / "page.png").read_bytes()[:4] == b"\x89PNG"


def test_page_stops_at_end_of_text(page, gpt2_site):
    gen, [want] = python_greedy(site_dir(gpt2_site), [STOP_PROMPT], 16)
    assert want[-1] == gen.eot_id and len(want) < 16  # the export was built to end this prompt early
    row = open_page(page, gpt2_site, prompt=STOP_PROMPT, max_new_tokens=16, temperature=0)
    assert row["result"]["ids"] == want and row["result"]["text"].endswith("<|endoftext|>")
    assert "end of text" in page.inner_text("#status")


def test_page_generates_past_the_context_as_python_does(page, byte_site):
    """A 90-byte prompt and 30 new tokens pass the 96-token context: the page crops like gptx."""
    prompt = ("To be, or not to be, that is the question: " * 3)[:90]
    gen, want = python_greedy(site_dir(byte_site), [prompt], 30)
    row = open_page(page, byte_site, prompt=prompt, max_new_tokens=30, temperature=0)
    assert row["status"] == "done", row["error"]
    assert row["result"]["ids"] == want[0] and len(want[0]) == 30


def test_page_generates_pythons_greedy_tokens_with_a_byte_tokenizer(page, byte_site):
    gen, want = python_greedy(site_dir(byte_site), BYTE_PROMPTS, 24)
    rows = [open_page(page, byte_site, prompt=p, max_new_tokens=24, temperature=0) for p in BYTE_PROMPTS]
    assert [r["result"]["prompt_ids"] for r in rows] == [gen.tokenizer.encode(p) for p in BYTE_PROMPTS]
    assert [r["result"]["ids"] for r in rows] == want
    assert [r["result"]["text"] for r in rows] == [gen.tokenizer.decode(ids) for ids in want]


def test_page_decodes_an_int8_cache_as_python_does(page, int8_site):
    """The causal attention's int8 KV cache: the page makes its empty pasts in the declared dtypes."""
    gen, want = python_greedy(site_dir(int8_site), BYTE_PROMPTS, 24)
    assert gen.cache[0]["dtype"] == "int8"
    rows = [open_page(page, int8_site, prompt=p, max_new_tokens=24, temperature=0) for p in BYTE_PROMPTS]
    assert [r["status"] for r in rows] == ["done"] * 2, [r["error"] for r in rows]
    assert [r["result"]["ids"] for r in rows] == want


def test_page_streams_the_text_as_it_is_generated(page, byte_site):
    page.add_init_script("""
        window.__seen = [];
        document.addEventListener('DOMContentLoaded', () => new MutationObserver(() =>
            window.__seen.push(document.getElementById('out-new').textContent)
        ).observe(document.getElementById('out-new'), {childList: true, characterData: true, subtree: true}));
    """)
    row = open_page(page, byte_site, prompt="To be", max_new_tokens=40, temperature=0)
    seen = page.evaluate("window.__seen")
    assert len(seen) >= 20 and seen[-1] == row["result"]["text"]  # one update per token, not one at the end
    assert len({len(s) for s in seen}) >= 10


def test_the_stop_button_ends_a_generation_early(page, byte_site):
    open_page(page, byte_site)
    page.fill("#prompt", "To be")
    page.fill("input[name=max_new_tokens]", "90")
    # press Stop as the first token appears (a tiny model writes 90 tokens faster than a click from here)
    page.evaluate("""new MutationObserver((_, observer) => { observer.disconnect(); document.getElementById('stop').click(); })
                     .observe(document.getElementById('out-new'), {childList: true, characterData: true, subtree: true})""")
    page.click("#go")
    row = state(page)
    assert row["status"] == "done" and len(row["result"]["ids"]) == 1
    assert "stopped" in page.inner_text("#status") and page.is_enabled("#go") and not page.is_enabled("#stop")


def test_page_sampling_settings(page, gpt2_site):
    gen, [greedy] = python_greedy(site_dir(gpt2_site), ["Hello world"], 12)
    top1 = open_page(page, gpt2_site, prompt="Hello world", max_new_tokens=12, temperature=1.0, top_k=1)
    assert top1["result"]["ids"] == greedy  # top-k 1 leaves only the most likely token
    nucleus = submit_form(page, "Hello world", max_new_tokens=12, temperature=1.5, top_k="", top_p=1e-6)
    assert nucleus["result"]["ids"] == greedy  # so does a tiny nucleus
    runs = [submit_form(page, "Hello world", max_new_tokens=12, temperature=1.0, top_k=1000, top_p=0.95) for _ in range(2)]
    assert all(r["status"] == "done" and len(r["result"]["ids"]) >= 1 for r in runs)
    assert "top_p=0.95" in page.url and "top_k=1000" in page.url  # the URL repeats the form's settings
    seeded = [open_page(page, gpt2_site, prompt="Hello world", max_new_tokens=12, temperature=1.0, seed=s)["result"]["ids"]
              for s in (7, 7, 8)]
    assert seeded[0] == seeded[1] != seeded[2] and seeded[0] != greedy


def test_page_takes_prompt_ids_and_can_decode_past_end_of_text(page, gpt2_site):
    """ids= feeds the prompt token for token (what gptx bench does); stop_at_eot=0 keeps decoding
    past end-of-text, as Python with eot_id=None; gptx.generate(query) reruns on the loaded model."""
    gen = OnnxGenerator(site_dir(gpt2_site))
    ids = gen.tokenizer.encode(STOP_PROMPT)
    stops, = gen.generate([ids], 16, Sampler(temperature=0)).ids
    full, = gen.generate([ids], 16, Sampler(temperature=0), eot_id=None).ids
    assert stops[-1] == gen.eot_id and len(stops) < 16 == len(full)
    page.goto(gpt2_site.url + "?" + urlencode({"ids": ",".join(map(str, ids)), "max_new_tokens": 16, "temperature": 0}))
    row = state(page)
    assert row["status"] == "done" and row["result"]["prompt_ids"] == ids and row["result"]["ids"] == stops
    again = page.evaluate("q => gptx.generate(q)", urlencode({"ids": ",".join(map(str, ids)), "max_new_tokens": 16,
                                                              "temperature": 0, "stop_at_eot": 0}))
    assert again["status"] == "done" and again["result"]["ids"] == full, again["error"]
    assert again["stats"]["new_tokens"] == 16 and again["stats"]["cross_origin_isolated"] is True
    assert page.inner_text("#out-prompt") == STOP_PROMPT  # the ids, decoded


@pytest.mark.parametrize("query, message", [
    ({"ids": "464,x"}, 'ids: expected comma-separated token ids below 50257, got "x"'),
    ({"ids": "50257"}, 'ids: expected comma-separated token ids below 50257, got "50257"'),
    ({"ids": ""}, 'ids: expected comma-separated token ids below 50257, got ""'),
    ({"ids": "464", "prompt": "Hello"}, "ids: give the prompt as text or as ids, not both"),
    ({"ids": "464", "stop_at_eot": "2"}, "stop_at_eot: expected an integer in [0, 1]"),
])
def test_page_reports_bad_prompt_ids(page, gpt2_site, query, message):
    page.goto(gpt2_site.url + "?" + urlencode(query))
    row = state(page)
    assert row["status"] == "error" and message in row["error"], row
    assert page.is_enabled("#go")


@pytest.mark.parametrize("query, message", [
    ({"temperature": "-1"}, "temperature: expected a number >= 0"),
    ({"temperature": "nan"}, "temperature: expected a number"),
    ({"max_new_tokens": "0"}, "max_new_tokens: expected an integer >= 1"),
    ({"max_new_tokens": str(2**70)}, "max_new_tokens: expected an integer"),
    ({"top_p": "1.5"}, "top_p: expected a number in (0, 1]"),
    ({"top_k": "2.5"}, "top_k: expected an integer"),
])
def test_page_reports_bad_settings(page, gpt2_site, query, message):
    row = open_page(page, gpt2_site, prompt="Hello", **query)
    assert row["status"] == "error" and message in row["error"], row
    assert message in page.inner_text("#status")
    assert page.is_enabled("#go")  # the model is loaded: the form still works


TRAVEL_PROMPTS = ["ROMEO: hello there, world", "<|endoftext|>  x\u0085y \ufeffz", "naïve café 🙂 İstanbul ΣΑΣ"]


@pytest.fixture(scope="session")
def travel_site(tmp_path_factory, web_cache):
    """An export of the travel plugin's ``letters`` tokenizer (its own tokenizer.json); the plugin
    is installed for this process's reference ids, not for the server, which needs none."""
    import sys

    from gptx import registry as registry_mod
    from helpers import install_plugin_packages

    site = install_plugin_packages(tmp_path_factory.mktemp("plugins"), ["gptx-travel-plugin"])
    sys.path.insert(0, str(site))
    registry_mod.use(None)
    try:
        out = wandering_export(tmp_path_factory.mktemp("letters"), "letters", seed=3)
        gen, want = python_greedy(out, TRAVEL_PROMPTS, 12)
        prompt_ids = [gen.tokenizer.encode(p) for p in TRAVEL_PROMPTS]
    finally:
        sys.path.remove(str(site))
        registry_mod.use(None)
    for s in serve(out, web_cache):
        yield s, prompt_ids, want


@pytest.fixture(scope="session")
def hf_kind_site(tmp_path_factory, web_cache):
    import json

    shipped = Path(__file__).resolve().parents[1] / "experiments" / "data" / "tokenizer.json"
    state = {"tokenizer_json": json.loads(shipped.read_text(encoding="utf-8"))}
    yield from serve(wandering_export(tmp_path_factory.mktemp("hf"), "hf", seed=3, state=state), web_cache)


def test_page_runs_any_tokenizer_json_with_pythons_ids(page, hf_kind_site, travel_site):
    """The hf kind and a third-party tokenizer reach the browser through their tokenizer.json."""
    gen, want = python_greedy(site_dir(hf_kind_site), TRAVEL_PROMPTS, 12)
    site, prompt_ids, plugin_want = travel_site
    for server, ids, expected in [(hf_kind_site, [gen.tokenizer.encode(p) for p in TRAVEL_PROMPTS], want),
                                  (site, prompt_ids, plugin_want)]:
        rows = [open_page(page, server, prompt=TRAVEL_PROMPTS[0], max_new_tokens=12, temperature=0)]
        rows += [submit_form(page, p, max_new_tokens=12, temperature=0) for p in TRAVEL_PROMPTS[1:]]
        for prompt, row, want_prompt, want_ids in zip(TRAVEL_PROMPTS, rows, ids, expected):
            assert row["status"] == "done", row["error"]
            assert row["result"]["prompt_ids"] == want_prompt, prompt
            assert row["result"]["ids"] == want_ids, prompt
