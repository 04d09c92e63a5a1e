"""gptx prepare and the streaming tokenizer behind it: ids exactly those of encoding the whole
text at once (GPT-2 BPE, char, byte; files, directories, jsonl; pieces cut at every safe place,
read blocks cut inside UTF-8 characters, several worker processes), llm.c's shard format read
back by plain numpy, the split, the manifest, atomic output, progress lines."""
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import SHAKESPEARE, gptx

from gptx import prepare as prep
from gptx import shards
from gptx.errors import GptxError
from gptx.plugins.tokenizers import ByteTokenizer, CharTokenizer, GPT2Tokenizer
from gptx.progress import StatusLine

# whitespace runs, CRLF, tabs, non-breaking and ideographic spaces, 2- to 4-byte UTF-8, digits,
# contractions and the special token: everything that decides where byte-level BPE may be cut
TRICKY = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\n\nAll:\r\nSpeak,  speak.\n \n"
          "\tTab\there\xa0nbsp\u3000wide  中文 テキスト 😀 emoji's we'll 12345 67\n<|endoftext|>Next doc\n") * 40


def llmc_read(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A shard read as llm.c's C loader does: 256 int32 header, then the tokens."""
    raw = path.read_bytes()
    header = np.frombuffer(raw[:1024], dtype="<i4")
    dtype = {(20240520, 1): "<u2", (20240801, 7): "<u4"}[(int(header[0]), int(header[1]))]
    tokens = np.frombuffer(raw[1024:], dtype=dtype)
    assert len(tokens) == header[2]
    return header, tokens


def all_ids(out: Path) -> np.ndarray:
    meta = json.loads((out / shards.MANIFEST).read_text())
    return np.concatenate([llmc_read(out / s["file"])[1] for split in ("train", "val") for s in meta["shards"][split]])


@pytest.fixture
def small_pieces(monkeypatch):
    """Pieces of ~300 characters read in 257-byte blocks: cuts everywhere, characters split by blocks."""
    monkeypatch.setattr(prep, "PIECE_CHARS", 300)
    monkeypatch.setattr(prep, "READ_BYTES", 257)


def fitted_char(text: str) -> CharTokenizer:
    tok = CharTokenizer(None)
    tok.fit(text)
    return tok


@pytest.mark.parametrize("kind", ["gpt2", "char", "byte"])
def test_ids_equal_encoding_the_whole_text_at_once(tmp_path, small_pieces, kind):
    src = tmp_path / "tricky.txt"
    src.write_text(TRICKY, encoding="utf-8", newline="")
    tok = {"gpt2": GPT2Tokenizer, "char": CharTokenizer, "byte": ByteTokenizer}[kind](None)
    manifest = prep.prepare(src, tmp_path / "out", kind, tok, prep.PrepareArgs(shard_tokens=2000, workers=1))
    whole = (fitted_char(TRICKY) if kind == "char" else tok).encode(TRICKY)
    assert all_ids(tmp_path / "out").tolist() == whole
    assert manifest["max_token_id"] == max(whole)
    if kind == "char":
        assert manifest["tokenizer"]["state"] == {"chars": sorted(set(TRICKY))}  # learned while streaming


@pytest.mark.slow
def test_two_worker_processes_give_the_same_shards(tmp_path, small_pieces):
    src = tmp_path / "tricky.txt"
    src.write_text(TRICKY, encoding="utf-8", newline="")
    one = prep.prepare(src, tmp_path / "one", "gpt2", GPT2Tokenizer(None), prep.PrepareArgs(shard_tokens=3000, workers=1))
    two = prep.prepare(src, tmp_path / "two", "gpt2", GPT2Tokenizer(None), prep.PrepareArgs(shard_tokens=3000, workers=2))
    assert one["shards"] == two["shards"]  # the same files, byte for byte (sha256)
    assert all_ids(tmp_path / "two").tolist() == GPT2Tokenizer(None).encode(TRICKY)


def test_a_directory_is_its_txt_files_joined_by_blank_lines(tmp_path, small_pieces):
    d = tmp_path / "corpus"
    (d / "sub").mkdir(parents=True)
    parts = {"a.txt": TRICKY[:5000], "b.md": "not read", "sub/c.txt": "Third file.\n", "z.txt": TRICKY[5000:9000]}
    for name, text in parts.items():
        (d / name).write_text(text, encoding="utf-8", newline="")
    prep.prepare(d, tmp_path / "out", "gpt2", GPT2Tokenizer(None), prep.PrepareArgs(shard_tokens=2000, workers=1))
    joined = "\n\n".join(parts[n] for n in ("a.txt", "sub/c.txt", "z.txt"))
    assert all_ids(tmp_path / "out").tolist() == GPT2Tokenizer(None).encode(joined)


def test_jsonl_documents_each_follow_an_end_of_text_token(tmp_path, small_pieces):
    docs = [TRICKY[:700], "short one", "", TRICKY[700:2900], "last"]
    src = tmp_path / "docs.jsonl"
    src.write_text("\n".join(json.dumps({"text": t, "id": i}) for i, t in enumerate(docs)) + "\n\n", encoding="utf-8")
    tok = GPT2Tokenizer(None)
    manifest = prep.prepare(src, tmp_path / "out", "gpt2", tok, prep.PrepareArgs(shard_tokens=1500, workers=1))
    assert all_ids(tmp_path / "out").tolist() == tok.encode("".join("<|endoftext|>" + t for t in docs))
    assert manifest["source"] | {"path": None} == {"path": None, "kind": "jsonl", "bytes": src.stat().st_size,
                                                   "files": 1, "documents": 5}


def test_shards_split_and_manifest(tmp_path):
    text = SHAKESPEARE.read_text()
    tok = GPT2Tokenizer(None)
    manifest = prep.prepare(SHAKESPEARE, tmp_path / "out", "gpt2", tok,
                            prep.PrepareArgs(val_fraction=0.25, shard_tokens=60_000, workers=1))
    ids = np.array(tok.encode(text))
    n_train = int(len(ids) * 0.75)  # the text dataset's (nanoGPT's) split
    got = {}
    for split in ("train", "val"):
        parts = []
        for s in manifest["shards"][split]:
            header, tokens = llmc_read(tmp_path / "out" / s["file"])
            assert (header[0], header[1]) == (20240520, 1) and not header[3:].any()
            assert 0 < len(tokens) <= 60_000 and s["tokens"] == len(tokens)
            assert s["sha256"] == shards.file_sha256(tmp_path / "out" / s["file"])
            assert s["bytes"] == 1024 + 2 * len(tokens)
            parts.append(tokens)
        got[split] = np.concatenate(parts)
    assert np.array_equal(got["train"], ids[:n_train]) and np.array_equal(got["val"], ids[n_train:])
    assert manifest["tokens"] == {"train": n_train, "val": len(ids) - n_train}
    assert [s["file"] for s in manifest["shards"]["train"]] == [f"train_{i:06d}.bin" for i in range(5)]
    assert manifest["max_token_id"] == int(ids.max()) and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"]["kind"] == "gpt2" and manifest["tokenizer"]["class"].endswith(":GPT2Tokenizer")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        [shards.MANIFEST] + [s["file"] for split in ("train", "val") for s in manifest["shards"][split]])


class WideBytes(ByteTokenizer):
    """A vocabulary beyond 65,536 ids: bytes shifted up by 70,000."""

    @property
    def vocab_size(self):
        return 70_256

    def encode(self, text):
        return [b + 70_000 for b in text.encode("utf-8")]


def test_vocabularies_beyond_uint16_get_llmcs_uint32_header(tmp_path):
    src = tmp_path / "t.txt"
    src.write_text("héllo wörld\n" * 300)
    manifest = prep.prepare(src, tmp_path / "out", "wide", WideBytes(None), prep.PrepareArgs(shard_tokens=2000))
    header, tokens = llmc_read(tmp_path / "out" / manifest["shards"]["train"][0]["file"])
    assert (header[0], header[1]) == (20240801, 7) and tokens.dtype == np.dtype("<u4")
    assert all_ids(tmp_path / "out").tolist() == WideBytes(None).encode("héllo wörld\n" * 300)


def test_reader_refuses_damaged_shards(tmp_path):
    writer = shards.ShardWriter(tmp_path / "good.bin", "uint16")
    writer.write(np.arange(2000))
    good = writer.close()
    assert shards.open_shard(good).tolist() == list(range(2000))
    raw = good.read_bytes()
    cases = {
        "truncated.bin": (raw[:-7], "header says 2000 tokens but the file holds"),
        "stub.bin": (raw[:100], "shorter than the 1024-byte shard header"),
        "magic.bin": (np.array([1234, 1], "<i4").tobytes() + raw[8:], "not a token shard (magic/version 1234/1"),
        "version.bin": (raw[:4] + np.array([2], "<i4").tobytes() + raw[8:], "magic/version 20240520/2"),
        "count.bin": (raw[:8] + np.array([5], "<i4").tobytes() + raw[12:], "header says 5 tokens"),
        "empty.bin": (b"", "shorter than the 1024-byte"),
    }
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(GptxError, match=message.replace("(", r"\(")) as err:
            shards.open_shard(tmp_path / name)
        assert name in str(err.value)


def test_a_failure_midway_leaves_nothing_and_keeps_an_earlier_output(tmp_path, small_pieces):
    src = tmp_path / "late-binary.txt"
    src.write_bytes(TRICKY.encode() + b"\x00tail")  # the NUL byte only shows up near the end
    out = tmp_path / "deep" / "out"
    with pytest.raises(GptxError, match="looks binary"):
        prep.prepare(src, out, "byte", ByteTokenizer(None), prep.PrepareArgs(shard_tokens=2000))
    assert sorted(tmp_path.iterdir()) == [src]  # no out, no partial directory, no parent it created
    good = tmp_path / "good.txt"
    good.write_text(TRICKY)
    first = prep.prepare(good, out, "byte", ByteTokenizer(None), prep.PrepareArgs(shard_tokens=2000))
    with pytest.raises(GptxError, match="looks binary"):
        prep.prepare(src, out, "byte", ByteTokenizer(None), prep.PrepareArgs(shard_tokens=2000))
    assert json.loads((out / shards.MANIFEST).read_text()) == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["out"]
    again = prep.prepare(good, out, "byte", ByteTokenizer(None), prep.PrepareArgs(shard_tokens=5000))  # replaces it
    assert again["shards"]["train"][0]["tokens"] == 5000 and sorted(p.name for p in out.parent.iterdir()) == ["out"]


def test_an_earlier_output_moved_aside_by_a_killed_prepare_comes_back(tmp_path, small_pieces):
    """A kill between replace_dir's two renames leaves OUT_DIR absent and the earlier output in
    .out.old-<pid>-*/old: the next prepare puts it back before it writes, so it survives even when
    that prepare fails too."""
    good, bad, out = tmp_path / "good.txt", tmp_path / "late-binary.txt", tmp_path / "out"
    good.write_text(TRICKY)
    bad.write_bytes(TRICKY.encode() + b"\x00tail")
    first = prep.prepare(good, out, "byte", ByteTokenizer(None), prep.PrepareArgs(shard_tokens=2000))
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    aside, partial = tmp_path / f".out.old-{dead}-abc123", tmp_path / f".out.partial-{dead}-abc123"
    for made in (aside, partial):  # as temp_sibling makes them: marked as gptx's
        made.mkdir()
        (made / ".gptx-temporary").write_text(made.name)
    os.rename(out, aside / "old")  # the killed prepare's first rename
    (partial / "part_000000.bin").write_bytes(b"half")  # its finished output, never renamed into place
    with pytest.raises(GptxError, match="looks binary"):
        prep.prepare(bad, out, "byte", ByteTokenizer(None), prep.PrepareArgs(shard_tokens=2000))
    assert json.loads((out / shards.MANIFEST).read_text()) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["good.txt", "late-binary.txt", "out"]


@pytest.mark.slow
def test_kill_9_midway_then_rerun(tmp_path):
    """SIGKILL while shards are being written: OUT_DIR never appears half-made; the rerun cleans
    the dead run's temporary directory and writes a whole output."""
    src = tmp_path / "big.txt"
    src.write_text(SHAKESPEARE.read_text() * 8)
    out = tmp_path / "out"
    args = ["prepare", src, "-o", out, "--tokenizer", "byte", "--shard-tokens", "20000", "--workers", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "gptx", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.partial-*/part_000002.bin")):
        assert proc.poll() is None and time.time() < deadline, "prepare ended before it could be killed"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists() and list(tmp_path.glob(".out.partial-*"))
    r = gptx(*args, "--quiet")
    assert r.returncode == 0, r.stderr
    assert not list(tmp_path.glob(".out.partial-*"))
    assert all_ids(out).tolist() == list(src.read_bytes())


def test_cli_prepare_prints_progress_and_a_summary(tmp_path):
    r = gptx("prepare", SHAKESPEARE, "-o", tmp_path / "out", "--tokenizer", "char", "--shard-tokens", "300000",
             "--val-fraction", "0.2")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # not a terminal, and shorter than the 10 s between plain status lines
    assert "892,315 train tokens in 3 shard(s), 223,079 val tokens in 2 shard(s) (uint16, tokenizer char of 65 tokens)" in r.stdout
    j = gptx("prepare", SHAKESPEARE, "-o", tmp_path / "out", "--tokenizer", "tiktoken", "--tokenizer-option",
             "encoding=gpt2", "--json", "--quiet")
    assert j.returncode == 0 and j.stderr == "", j.stderr
    assert json.loads(j.stdout)["tokenizer"] | {"sha256": None} == {
        "kind": "tiktoken", "class": "gptx.plugins.tokenizers:TiktokenTokenizer", "options": {"encoding": "gpt2"},
        "state": {}, "sha256": None}


def test_status_line_is_live_on_a_terminal_and_periodic_otherwise():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    term = Terminal()
    live = StatusLine(term)
    for i in range(3):
        live(f"tokenizing {i}")
    live.close()
    assert term.getvalue() == "\r\033[Ktokenizing 0\r\033[Ktokenizing 1\r\033[Ktokenizing 2\n"
    log = io.StringIO()
    with StatusLine(log, every=0.3) as plain:
        for i in range(3):
            plain(f"tokenizing {i}")
        time.sleep(0.35)
        plain("tokenizing 3")
        plain("tokenizing 4")
    assert log.getvalue() == "tokenizing 3\ntokenizing 4\n"  # one every 0.3 s; the last at the end
    short = io.StringIO()
    with StatusLine(short, every=3600) as plain:
        plain("tokenized in no time")
    assert short.getvalue() == ""  # a job shorter than the interval stays quiet
    failed = io.StringIO()
    with pytest.raises(KeyError), StatusLine(failed, every=3600) as plain:
        plain("tokenizing 0")
        raise KeyError("the job failed")
    assert failed.getvalue() == ""  # the error alone is the message


def test_status_lines_carry_bytes_tokens_rate_and_eta(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "UPDATE_SECONDS", 0.0)
    monkeypatch.setattr(prep, "PIECE_CHARS", 50_000)
    lines = []
    prep.prepare(SHAKESPEARE, tmp_path / "out", "byte", ByteTokenizer(None), prep.PrepareArgs(), lines.append)
    assert len(lines) > 10
    assert lines[5].startswith("tokenizing tinyshakespeare.txt [")
    for part in ("%", "/1.1 MB", " tokens, ", " MB/s, ETA "):
        assert part in lines[5], lines[5]
    assert lines[-1].startswith("tokenized tinyshakespeare.txt: 1.1 MB -> 1,115,394 tokens in ")
    fit_lines = []
    prep.prepare(SHAKESPEARE, tmp_path / "char", "char", CharTokenizer(None), prep.PrepareArgs(), fit_lines.append)
    assert fit_lines[0].startswith("learning the vocabulary from tinyshakespeare.txt [")
    assert any(line.startswith("learned the CharTokenizer vocabulary (65 tokens) from 1.1 MB") for line in fit_lines)


def test_safe_cut_keeps_gpt2_ids_on_random_text():
    import random

    tok = GPT2Tokenizer(None)
    alphabet = ["a", "Zq", "é", "中", "1", "23", " ", "  ", "\n", "\n\n", "\r\n", "\t", "\xa0", "\u3000", "\x0c",
                "'s", "'ll", ".", "!?", "<|endoftext|>", "😀", "\x1c", " \n", "\n "]
    rng = random.Random(0)
    for _ in range(400):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 120)))
        chunker = prep.Chunker(rng.randint(1, 12))
        pieces = [p for i in range(0, len(text), 7) for p in chunker.feed(text[i:i + 7])] + list(chunker.flush())
        assert "".join(pieces) == text
        assert [t for p in pieces for t in tok.encode(p)] == tok.encode(text), repr(text)


def test_utf8_boundaries_and_error_offsets(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "READ_BYTES", 5)
    for data in ("aé中😀" * 7).encode(), ("😀" * 9).encode():
        assert prep._utf8_boundary(data[:-1]) < len(data) - 1
        (tmp_path / "u.txt").write_bytes(data)
        assert "".join(t for _, t in prep.Source(tmp_path / "u.txt").texts()) == data.decode()
    (tmp_path / "bad.txt").write_bytes("aé中".encode() * 5 + b"\xff" + b"tail")
    with pytest.raises(GptxError, match=r"bad.txt is not UTF-8 text \(invalid byte at offset 30\)"):
        list(prep.Source(tmp_path / "bad.txt").texts())
    (tmp_path / "cut.txt").write_bytes("abc".encode() + "中".encode()[:2])
    with pytest.raises(GptxError, match=r"offset 3\)"):
        list(prep.Source(tmp_path / "cut.txt").texts())


def test_a_tokenizer_without_encodes_in_pieces_gets_the_whole_text(tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "PIECE_CHARS", 100)

    class Whole(ByteTokenizer):
        encodes_in_pieces = False
        calls = []

        def encode(self, text):
            self.calls.append(len(text))
            return super().encode(text)

    src = tmp_path / "t.txt"
    src.write_text(TRICKY)
    tok = Whole(None)
    prep.prepare(src, tmp_path / "out", "whole", tok, prep.PrepareArgs(shard_tokens=2000))
    assert tok.calls == [len(TRICKY)]


@pytest.mark.slow
def test_a_script_without_a_main_guard_can_use_workers(tmp_path):
    """Workers must not re-run the caller's script (a spawned worker would, and block on the cache lock)."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from gptx.data import cached_tokens\n"
        "from gptx.prepare import Source\n"
        "from gptx.plugins.tokenizers import GPT2Tokenizer\n"
        f"ids = cached_tokens(Source({str(SHAKESPEARE)!r}), GPT2Tokenizer(None), workers=2)\n"
        "print(len(ids))\n")
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=300,
                       env=os.environ | {"GPTX_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(len(GPT2Tokenizer(None).encode(SHAKESPEARE.read_text())))]
