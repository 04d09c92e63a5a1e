"""The text and tokens datasets: the text dataset keeps gptx's numbers (ids, split, windows and
the training stream for a seed); the tokens dataset draws windows inside one shard, uniformly
over positions, serves any rank's rows of the global batch, resumes bitwise, and refuses a
damaged, foreign or mismatched prepared directory before anything is created."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import SHAKESPEARE

from gptx import prepare as prep
from gptx import shards
from gptx.errors import ConfigError
from gptx.plugins.datasets import TextDataset, TextOptions, TokensDataset, TokensOptions
from gptx.plugins.tokenizers import ByteTokenizer, CharTokenizer, GPT2Tokenizer

T = 32


def text_dataset(tokenizer, block_size=T, seed=1337, path=SHAKESPEARE, val_fraction=0.1):
    ds = TextDataset(TextOptions(path=str(path), val_fraction=val_fraction), base_dir=Path("/"), tokenizer=tokenizer,
                     block_size=block_size, seed=seed)
    ds.prepare()
    return ds


def tokens_dataset(directory, tokenizer, block_size=T, seed=0, verify="size"):
    ds = TokensDataset(TokensOptions(path=directory.name, verify=verify), base_dir=directory.parent,
                       tokenizer=tokenizer, block_size=block_size, seed=seed)
    ds.prepare()
    return ds


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """tiny Shakespeare as GPT-2 tokens in shards of 20,000 (the last train shard shorter)."""
    out = tmp_path_factory.mktemp("prepared") / "shakespeare"
    prep.prepare(SHAKESPEARE, out, "gpt2", GPT2Tokenizer(None), prep.PrepareArgs(shard_tokens=20_000, workers=1))
    return out


def old_windows(data: np.ndarray, count: int, generator: torch.Generator):
    """gptx's windows before datasets were components (core/data.py, Dataset.windows)."""
    starts = torch.randint(len(data) - T, (count,), generator=generator).numpy()
    rows = torch.from_numpy(np.asarray(data[starts[:, None] + np.arange(T + 1)], dtype=np.int64))
    return rows[:, :-1], rows[:, 1:]


@pytest.mark.parametrize("kind", ["gpt2", "char"])
def test_text_dataset_keeps_gptxs_ids_split_windows_and_stream(kind):
    text = SHAKESPEARE.read_text()
    tok = GPT2Tokenizer(None) if kind == "gpt2" else CharTokenizer(None)
    ds = text_dataset(tok)
    ids = np.array(tok.encode(text))  # the char tokenizer is fitted by prepare()
    n_train = int(len(ids) * 0.9)
    assert np.array_equal(ds.train, ids[:n_train]) and np.array_equal(ds.val, ids[n_train:])
    assert (ds.tokens("train"), ds.tokens("val")) == (n_train, len(ids) - n_train)
    g_new, g_old = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for split, data in (("train", ds.train), ("val", ds.val), ("train", ds.train)):
        new, old = ds.windows(split, 7, g_new), old_windows(data, 7, g_old)
        assert torch.equal(new[0], old[0]) and torch.equal(new[1], old[1])
    stream = torch.Generator().manual_seed(1337)  # gptx run's training stream: windows("train", ...) of the seed
    for _ in range(3):
        x, y = ds.batch(12)
        ox, oy = old_windows(ds.train, 12, stream)
        assert torch.equal(x, ox) and torch.equal(y, oy)


def test_batch_rows_state_and_resume_are_exact(prepared):
    a = tokens_dataset(prepared, GPT2Tokenizer(None), seed=7)
    b = tokens_dataset(prepared, GPT2Tokenizer(None), seed=7)
    full = a.batch(8)
    rank0 = b.batch(8, slice(0, 4))  # two ranks: each draws the same 8 windows, reads its 4
    rank1 = tokens_dataset(prepared, GPT2Tokenizer(None), seed=7).batch(8, slice(4, 8))
    assert torch.equal(torch.cat([rank0[0], rank1[0]]), full[0]) and torch.equal(torch.cat([rank0[1], rank1[1]]), full[1])
    strided = tokens_dataset(prepared, GPT2Tokenizer(None), seed=7).batch(8, slice(1, None, 2))
    assert torch.equal(strided[1], full[1][1::2])
    state = a.state_dict()
    path = prepared.parent / "state.pt"
    torch.save(state, path)
    after = [a.batch(4) for _ in range(3)]
    resumed = tokens_dataset(prepared, GPT2Tokenizer(None), seed=999)
    resumed.load_state_dict(torch.load(path, weights_only=True))
    for want in after:
        got = resumed.batch(4)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.parametrize("split", ["train", "val"])
def test_windows_lie_inside_one_shard_uniformly_over_positions(prepared, split):
    ds = tokens_dataset(prepared, GPT2Tokenizer(None))
    meta = shards.read_manifest(prepared)
    arrays = [shards.open_shard(prepared / s["file"]) for s in meta["shards"][split]]
    assert len(arrays) > 1  # the split's shards: 20,000 tokens each, the boundary's parts shorter
    every = np.stack([np.asarray(a[i:i + T + 1], dtype=np.int64) for a in arrays for i in range(len(a) - T)])
    data = ds.splits[split]
    x, y = data.gather(np.arange(len(every)))  # position p is the p-th window of the shards in order
    assert np.array_equal(torch.cat([x, y[:, -1:]], 1).numpy(), every)
    assert len(every) == ds.tokens(split) - T * len(arrays)
    xw, yw = ds.windows(split, 9, torch.Generator().manual_seed(4))
    p = torch.randint(len(every), (9,), generator=torch.Generator().manual_seed(4)).numpy()  # uniform positions
    assert np.array_equal(torch.cat([xw, yw[:, -1:]], 1).numpy(), every[p])
    draws = data.draw(200_000, torch.Generator().manual_seed(0))
    shard_of = np.searchsorted(data.first, draws, side="right") - 1
    share = np.bincount(shard_of, minlength=len(arrays)) / len(draws)
    expected = data.positions / data.positions.sum()
    assert np.abs(share - expected).max() < 0.01  # a short shard is drawn less often


def test_tiled_windows_tile_each_shard(prepared):
    ds = tokens_dataset(prepared, GPT2Tokenizer(None))
    meta = shards.read_manifest(prepared)
    arrays = [np.asarray(shards.open_shard(prepared / s["file"]), dtype=np.int64) for s in meta["shards"]["train"]]
    want = np.concatenate([a[: (len(a) - 1) // T * T].reshape(-1, T) for a in arrays])
    x, y = ds.tiled_windows("train", 10**9)
    assert np.array_equal(x.numpy(), want)
    assert np.array_equal(y.numpy(), np.concatenate([a[1: (len(a) - 1) // T * T + 1].reshape(-1, T) for a in arrays]))
    capped, _ = ds.tiled_windows("train", 5 * T)
    assert len(capped) == 5 and torch.equal(capped[0], x[0]) and torch.equal(capped[-1], x[-1])


def test_char_shards_bring_their_vocabulary(tmp_path):
    prep.prepare(SHAKESPEARE, tmp_path / "char", "char", CharTokenizer(None), prep.PrepareArgs(shard_tokens=100_000))
    ds = tokens_dataset(tmp_path / "char", CharTokenizer(None))
    assert ds.tokenizer.vocab_size == 65 and ds.tokenizer.encode("ROMEO:") == text_dataset(CharTokenizer(None)).tokenizer.encode("ROMEO:")
    other = CharTokenizer(None, {"chars": list("abc")})
    with pytest.raises(ConfigError, match="another learned vocabulary"):
        tokens_dataset(tmp_path / "char", other)


def damage(src: Path, dst: Path, how) -> Path:
    shutil.copytree(src, dst)
    how(dst, json.loads((dst / shards.MANIFEST).read_text()))
    return dst


def set_manifest(d: Path, meta: dict, **changes):
    (d / shards.MANIFEST).write_text(json.dumps(meta | changes))


def rewrite(path: Path, fn):
    path.write_bytes(fn(path.read_bytes()))


BAD = {
    "missing": (lambda d, m: shutil.rmtree(d), "no such directory of prepared shards"),
    "empty": (lambda d, m: [p.unlink() for p in d.iterdir()], "not a prepared data directory (no gptx_data.json"),
    "a file": (lambda d, m: (shutil.rmtree(d), d.write_text("x")), "is a file, expected a directory"),
    "corrupted manifest": (lambda d, m: (d / shards.MANIFEST).write_text("{oops"), "gptx_data.json: corrupted"),
    "foreign manifest": (lambda d, m: set_manifest(d, m, format="other"), "not a prepared data directory (format is 'other')"),
    "newer manifest": (lambda d, m: set_manifest(d, m, format_version=99), "written by a newer gptx"),
    "malformed manifest": (lambda d, m: set_manifest(d, m, shards={"train": []}), "gptx_data.json: shards.train: list should have at least 1 item"),
    "path in manifest": (lambda d, m: set_manifest(d, m, shards=m["shards"] | {"val": [{"file": "../x.bin", "tokens": 9}]}),
                         "gptx_data.json: shards.val[0].file: expected a file name inside the directory, got '../x.bin'"),
    "missing shard": (lambda d, m: (d / "train_000001.bin").unlink(), "train_000001.bin: missing (listed in gptx_data.json)"),
    "truncated shard": (lambda d, m: rewrite(d / "train_000000.bin", lambda b: b[:-10]), "train_000000.bin: its header says 20000 tokens"),
    "bad magic": (lambda d, m: rewrite(d / "val_000000.bin", lambda b: b"\x00" * 4 + b[4:]), "val_000000.bin: not a token shard"),
    "shard swapped": (lambda d, m: shutil.copy(d / "train_000000.bin", d / "val_000000.bin"), "val_000000.bin: holds 20000 uint16 tokens"),
    "id beyond vocab": (lambda d, m: set_manifest(d, m, max_token_id=50257), "gptx_data.json: max_token_id: 50257 is beyond vocab_size 50257"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_prepared_directory_is_a_config_error_naming_the_file(prepared, tmp_path, case):
    how, message = BAD[case]
    d = damage(prepared, tmp_path / "data", how)
    before = sorted(tmp_path.rglob("*"))
    with pytest.raises(ConfigError) as err:
        tokens_dataset(d, GPT2Tokenizer(None))
    assert err.value.key == "data.path" and message in str(err.value), str(err.value)
    assert sorted(tmp_path.rglob("*")) == before


def test_another_tokenizer_is_refused(prepared):
    with pytest.raises(ConfigError, match=r"made with tokenizer 'gpt2' \(gptx.plugins.tokenizers:GPT2Tokenizer.*"
                                          r"the experiment's is gptx.plugins.tokenizers:ByteTokenizer"):
        tokens_dataset(prepared, ByteTokenizer(None))


def test_shards_too_short_for_the_block(prepared):
    with pytest.raises(ConfigError, match="the training split its longest shard has 20000 tokens, fewer than block_size"):
        tokens_dataset(prepared, GPT2Tokenizer(None), block_size=20_000)
    with pytest.raises(ConfigError, match=r"the training split has 22 tokens, fewer than block_size \+ 1 = 31"):
        text_dataset(CharTokenizer(None), block_size=30, path=SHAKESPEARE, val_fraction=0.99998)


def test_altered_contents_are_caught_by_sha256_or_when_the_shards_open(prepared, tmp_path):
    d = tmp_path / "data"
    shutil.copytree(prepared, d)
    shard = d / "train_000000.bin"
    raw = bytearray(shard.read_bytes())
    raw[1024:] = np.full((len(raw) - 1024) // 2, 65000, dtype="<u2").tobytes()  # same size, ids beyond the vocabulary
    shard.write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match="train_000000.bin: sha256 does not match"):
        tokens_dataset(d, GPT2Tokenizer(None), verify="sha256")
    # size only still reads each shard's highest id once, when it opens: refused before any run exists
    with pytest.raises(ConfigError, match="train_000000.bin: holds token id 65000, above the max_token_id"):
        tokens_dataset(d, GPT2Tokenizer(None))


def test_the_text_cache_survives_damage_and_an_unusable_cache_dir(tmp_path, monkeypatch):
    text = tmp_path / "t.txt"
    text.write_text(SHAKESPEARE.read_text()[:20_000])
    monkeypatch.setenv("GPTX_CACHE_DIR", str(tmp_path / "cache"))
    want = np.array(GPT2Tokenizer(None).encode(text.read_text()))
    text_dataset(GPT2Tokenizer(None), path=text)
    (entry,) = (tmp_path / "cache" / "tokens").glob("*.bin")
    entry.write_bytes(entry.read_bytes()[:-6])  # a damaged entry is made again, not trusted
    again = text_dataset(GPT2Tokenizer(None), path=text)
    assert np.array_equal(np.concatenate([again.train, again.val]), want)
    assert entry.stat().st_size == 1024 + 2 * len(want)
    (tmp_path / "blocker").write_text("a file where the cache directory would go")
    monkeypatch.setenv("GPTX_CACHE_DIR", str(tmp_path / "blocker"))
    uncached = text_dataset(GPT2Tokenizer(None), path=text)  # tokenized into a file deleted at once
    assert np.array_equal(np.concatenate([uncached.train, uncached.val]), want)
