"""Tokenizers: GPT-2 BPE offline from the shipped, verified files; char; byte; tiktoken by name."""
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from importlib import resources
from pathlib import Path

import pytest

from gptx.errors import GptxError
from gptx.plugins import tokenizers as tk

TEXTS = [
    "Hello world",
    "It's 2024!!  Ünïcødé 🙂 tabs\tand\r\nlines   trailing   ",
    " héllo 世界 <|endoftext|> \n\n  x",
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n",
]

# Run in a child process with every network call refused, so "offline" is a fact, not a hope.
NO_NETWORK = """
import socket
def _deny(*args, **kwargs):
    raise OSError("network disabled by the test")
socket.socket.connect = _deny
socket.socket.connect_ex = _deny
socket.create_connection = _deny
socket.getaddrinfo = _deny
"""


def bpe_dir() -> Path:
    return Path(str(resources.files("gptx.plugins") / "data" / "gpt2-bpe"))


def tokenizer(kind, **options):
    from gptx import registry

    entry = registry.registry().get("tokenizer", kind)
    return entry.cls(entry.cls.Options(**options), None)


def tiktoken_gpt2_cached() -> bool:
    """Whether tiktoken's own gpt2 files are in its cache (then get_encoding needs no network)."""
    cache = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or os.path.join(
        tempfile.gettempdir(), "data-gym-cache"
    )
    urls = [
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe",
        "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
    ]
    return all(os.path.exists(os.path.join(cache, hashlib.sha1(u.encode()).hexdigest())) for u in urls)


def reference_gpt2():
    """An independent GPT-2 BPE built from the same files: tiktoken's own ``gpt2`` when its files
    are cached offline, else Hugging Face ``tokenizers`` (a separate Rust implementation)."""
    if tiktoken_gpt2_cached():
        import tiktoken

        enc = tiktoken.get_encoding("gpt2")
        return lambda s: enc.encode(s, allowed_special="all")
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE

    t = Tokenizer(BPE.from_file(str(bpe_dir() / "encoder.json"), str(bpe_dir() / "vocab.bpe")))
    t.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(["<|endoftext|>"])
    return lambda s: t.encode(s).ids


def test_gpt2_hello_world():
    tok = tokenizer("gpt2")
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.decode([15496, 995]) == "Hello world"
    assert tok.vocab_size == 50257
    assert tok.eot_id == 50256
    assert tok.encode("<|endoftext|>") == [50256]


def test_gpt2_matches_an_independent_reference():
    ref = reference_gpt2()
    tok = tokenizer("gpt2")
    shakespeare = (Path(__file__).parents[1] / "experiments" / "data" / "tinyshakespeare.txt").read_text()[:30000]
    for text in TEXTS + [shakespeare]:
        ids = tok.encode(text)
        assert ids == ref(text), text[:40]
        assert tok.decode(ids) == text


def test_endoftext_written_in_text_is_the_separator_token():
    """Documents are joined with "<|endoftext|>" in the text; both BPE tokenizers read it as id 50256."""
    for tok in (tokenizer("gpt2"), tokenizer("tiktoken", encoding="gpt2")):
        assert tok.encode("doc one<|endoftext|>doc two") == tok.encode("doc one") + [50256] + tok.encode("doc two")


def test_tiktoken_kind_gpt2_is_the_same_encoding():
    a, b = tokenizer("gpt2"), tokenizer("tiktoken", encoding="gpt2")
    for text in TEXTS:
        assert a.encode(text) == b.encode(text)


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["/nonexistent/tiktoken-cache", ""])
def test_gpt2_works_offline_with_any_cache_dir(cache, tmp_path):
    script = NO_NETWORK + (
        "from gptx.plugins.tokenizers import GPT2Tokenizer\n"
        "t = GPT2Tokenizer(None)\n"
        "assert t.encode('Hello world') == [15496, 995], t.encode('Hello world')\n"
        "print('ok')\n"
    )
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=cache, DATA_GYM_CACHE_DIR=str(tmp_path / "dg"), HOME=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "ok"
    assert not Path(cache or "/nonexistent").exists()  # nothing copied into a cache
    assert not (tmp_path / "dg").exists()


@pytest.mark.slow
def test_other_tiktoken_encoding_offline_names_the_cache_dir(tmp_path):
    script = NO_NETWORK + (
        "from gptx.errors import GptxError\n"
        "from gptx.plugins.tokenizers import TiktokenTokenizer, TiktokenOptions\n"
        "try:\n"
        "    TiktokenTokenizer(TiktokenOptions('cl100k_base'))\n"
        "except GptxError as err:\n"
        "    print(err)\n"
    )
    env = dict(os.environ, TIKTOKEN_CACHE_DIR=str(tmp_path / "empty-cache"))
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "cl100k_base" in r.stdout and "TIKTOKEN_CACHE_DIR" in r.stdout, r.stdout


def test_sha256_rejects_a_tampered_file(tmp_path):
    for name in tk.GPT2_FILES:
        shutil.copy(bpe_dir() / name, tmp_path / name)
        assert tk.gpt2_bpe_file(name, tmp_path) == str(tmp_path / name)  # intact copy accepted
    data = bytearray((tmp_path / "vocab.bpe").read_bytes())
    data[-2] ^= 1  # flip one bit of one merge rule
    (tmp_path / "vocab.bpe").write_bytes(bytes(data))
    with pytest.raises(GptxError, match="sha256 .* does not match"):
        tk.gpt2_bpe_file("vocab.bpe", tmp_path)
    (tmp_path / "encoder.json").unlink()
    with pytest.raises(GptxError, match="encoder.json"):
        tk.gpt2_bpe_file("encoder.json", tmp_path)


def test_shipped_files_have_gpt2_hashes():
    for name, digest in tk.GPT2_FILES.items():
        assert hashlib.sha256((bpe_dir() / name).read_bytes()).hexdigest() == digest


def test_char_fit_encode_and_state_round_trip():
    tok = tokenizer("char")
    assert tok.requires_fit
    with pytest.raises(GptxError, match="no vocabulary"):
        tok.vocab_size
    text = "hello, wörld!\n"
    tok.fit(text)
    assert tok.vocab_size == len(set(text))
    ids = tok.encode("hello")
    assert tok.decode(ids) == "hello"
    assert tok.chars == sorted(set(text))  # nanoGPT's shakespeare_char order
    again = type(tok)(tok.options, tok.state())
    assert again.vocab_size == tok.vocab_size and again.encode(text) == tok.encode(text)
    with pytest.raises(GptxError, match="'z'"):
        tok.encode("z")


def test_byte_round_trip_including_unicode():
    tok = tokenizer("byte")
    assert tok.vocab_size == 256
    for text in TEXTS + ["\x00\xff", "日本語 — ελληνικά"]:
        ids = tok.encode(text)
        assert all(0 <= i < 256 for i in ids)
        assert ids == list(text.encode("utf-8"))
        assert tok.decode(ids) == text
    assert tok.decode([0xE4, 0xB8]) == "\ufffd"  # a cut multi-byte character does not raise


def test_tiktoken_unknown_name_is_a_clear_error():
    with pytest.raises(GptxError, match="tokenizer.encoding: .*no_such_encoding"):
        tokenizer("tiktoken", encoding="no_such_encoding")
