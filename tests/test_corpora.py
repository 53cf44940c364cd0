"""Corpus loaders: checks against documented facts, splits, tokenisation, and one-line errors."""

from __future__ import annotations

import hashlib
import os
import zipfile
from importlib.resources import files
from pathlib import Path

import numpy as np
import pytest
import torch

from tbptt_bench.errors import UsageError
from tbptt_bench.tasks import CharLMTask
from tbptt_bench.tasks.corpora import (
    KNOWN_FILES,
    PTB_END_OF_LINE,
    FileCheck,
    fraction_splits,
    load_corpus,
    load_enwik8,
    load_ptb_char,
    load_text,
    load_text8,
    load_tinyshakespeare,
    verify_bytes,
)

SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"


def one_line_error(excinfo: pytest.ExceptionInfo[UsageError], *parts: str) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)
    return message


def check(data: bytes) -> FileCheck:
    return FileCheck(size=len(data), md5=hashlib.md5(data).hexdigest(), sha256=hashlib.sha256(data).hexdigest())


# ---------------------------------------------------------------- documented facts and the bundled corpus


def test_bundled_shakespeare_matches_documented_facts() -> None:
    data = files("tbptt_bench").joinpath("data/tinyshakespeare.txt").read_bytes()
    assert len(data) == 1_115_394
    assert hashlib.sha256(data).hexdigest() == SHAKESPEARE_SHA256
    assert KNOWN_FILES["tinyshakespeare.txt"] == FileCheck(
        size=1_115_394, md5=hashlib.md5(data).hexdigest(), sha256=SHAKESPEARE_SHA256
    )
    corpus = load_tinyshakespeare()
    assert corpus.decode(corpus.tokens[:200]) == data[:200].decode("ascii")
    assert corpus.vocab_size == 65


def test_known_facts_are_only_the_certain_ones() -> None:
    assert KNOWN_FILES["enwik8"] == FileCheck(size=100_000_000, md5="a1fa5ffddb56f4953e226637dabbb36a")
    assert KNOWN_FILES["text8"] == FileCheck(size=100_000_000)  # no checksum: not known for certain


def test_shakespeare_checksum_enforced(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as excinfo:
        load_tinyshakespeare(expected=FileCheck(sha256="0" * 64))
    one_line_error(excinfo, "bundled tinyshakespeare.txt", "sha256", "0" * 64, SHAKESPEARE_SHA256)
    data = bytearray(files("tbptt_bench").joinpath("data/tinyshakespeare.txt").read_bytes())
    data[1000] ^= 1  # same size, one bit flipped
    corrupt = tmp_path / "tinyshakespeare.txt"
    corrupt.write_bytes(bytes(data))
    with pytest.raises(UsageError) as excinfo:
        load_tinyshakespeare(corrupt)
    one_line_error(excinfo, str(corrupt), "md5", "6fb458f1232090904fb40fe944165e91")
    corrupt.write_bytes(bytes(data[:-1]))
    with pytest.raises(UsageError) as excinfo:
        load_tinyshakespeare(tmp_path)  # a folder holding the file
    one_line_error(excinfo, "expected 1,115,394 bytes, found 1,115,393 bytes")


def test_verify_bytes() -> None:
    data = b"hello world"
    verify_bytes(data, "x", check(data))
    verify_bytes(data, "x", FileCheck())
    with pytest.raises(UsageError) as excinfo:
        verify_bytes(data, "x", FileCheck(size=12))
    one_line_error(excinfo, "x:", "expected 12 bytes, found 11 bytes")
    with pytest.raises(UsageError) as excinfo:
        verify_bytes(data, "x", FileCheck(md5="A" * 32))
    one_line_error(excinfo, "md5", "a" * 32, hashlib.md5(data).hexdigest())


def test_standard_split_sizes() -> None:
    assert fraction_splits(100_000_000) == {
        "train": (0, 90_000_000),
        "valid": (90_000_000, 95_000_000),
        "test": (95_000_000, 100_000_000),
    }
    assert fraction_splits(1_115_394)["train"] == (0, int(0.9 * 1_115_394))


# ---------------------------------------------------------------- enwik8 and text8 on small files


@pytest.fixture()
def random_bytes() -> bytes:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, size=2000, dtype=np.uint8).tobytes() + b"\x00"


def test_enwik8_loader_bytes_and_splits(tmp_path: Path, random_bytes: bytes) -> None:
    file = tmp_path / "enwik8"
    file.write_bytes(random_bytes)
    corpus = load_enwik8(file, expected=check(random_bytes))
    present = sorted(set(random_bytes))
    assert corpus.vocab == tuple(chr(b) for b in present)
    index = {b: i for i, b in enumerate(present)}
    assert corpus.tokens.tolist() == [index[b] for b in random_bytes]
    assert corpus.decode(corpus.tokens).encode("latin-1") == random_bytes
    n = len(random_bytes)
    assert corpus.splits == {"train": (0, 1800), "valid": (1800, 1900), "test": (1900, n)}
    assert corpus.decode(corpus.split("valid")).encode("latin-1") == random_bytes[1800:1900]
    with pytest.raises(UsageError, match="split"):
        corpus.split("dev")
    # the same file found through its folder and through a zip archive
    assert torch.equal(load_enwik8(tmp_path, expected=check(random_bytes)).tokens, corpus.tokens)
    archive = tmp_path / "zipped" / "enwik8.zip"
    archive.parent.mkdir()
    with zipfile.ZipFile(archive, "w") as z:
        z.writestr("enwik8", random_bytes)
    assert torch.equal(load_enwik8(archive.parent, expected=check(random_bytes)).tokens, corpus.tokens)


def test_enwik8_corrupt_wrong_size_missing(tmp_path: Path, random_bytes: bytes) -> None:
    file = tmp_path / "enwik8"
    corrupt = bytearray(random_bytes)
    corrupt[5] ^= 0xFF
    file.write_bytes(bytes(corrupt))
    with pytest.raises(UsageError) as excinfo:
        load_enwik8(file, expected=check(random_bytes))
    one_line_error(excinfo, str(file), "md5", hashlib.md5(random_bytes).hexdigest(), hashlib.md5(corrupt).hexdigest())
    with pytest.raises(UsageError) as excinfo:
        load_enwik8(file)  # the documented facts: 100,000,000 bytes
    one_line_error(excinfo, str(file), "expected 100,000,000 bytes, found 2,001 bytes")
    with pytest.raises(UsageError) as excinfo:
        load_enwik8(tmp_path / "nothing")
    one_line_error(excinfo, "not found", str(tmp_path / "nothing"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UsageError) as excinfo:
        load_enwik8(empty)
    one_line_error(excinfo, str(empty), "enwik8.zip")
    bad_zip = tmp_path / "other.zip"
    with zipfile.ZipFile(bad_zip, "w") as z:
        z.writestr("readme", b"x")
    with pytest.raises(UsageError) as excinfo:
        load_enwik8(bad_zip)
    one_line_error(excinfo, str(bad_zip), "no member 'enwik8'")


def test_text8_loader(tmp_path: Path) -> None:
    text = ("anarchism originated as a term of abuse " * 50).encode("ascii")
    file = tmp_path / "text8"
    file.write_bytes(text)
    corpus = load_text8(file, expected=FileCheck(size=len(text)))
    assert corpus.vocab == tuple(sorted(set(text.decode())))
    assert corpus.decode(corpus.tokens) == text.decode()
    assert corpus.splits["train"] == (0, len(text) * 9 // 10)
    with pytest.raises(UsageError) as excinfo:
        load_text8(file)
    one_line_error(excinfo, str(file), "expected 100,000,000 bytes, found 2,000 bytes")


# ---------------------------------------------------------------- PTB-char


def write_ptb(folder: Path, parts: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in parts.items():
        (folder / f"ptb.char.{split}.txt").write_text(text)


PTB = {
    "train": " a e r _ b a n k n o t e \n p i e r r e _ N _ y e a r s \n",
    "valid": " c o n s u m e r s _ m a y \n",
    "test": " n o _ i t _ w a s n ' t \n",
}


def test_ptb_char_loader(tmp_path: Path) -> None:
    write_ptb(tmp_path / "simple-examples" / "data", PTB)
    corpus = load_ptb_char(tmp_path / "simple-examples")  # the data/ subfolder is found
    expected: dict[str, list[str]] = {}
    for split, text in PTB.items():
        expected[split] = [s for line in text.splitlines() for s in line.split() + [PTB_END_OF_LINE]]
    everything = expected["train"] + expected["valid"] + expected["test"]
    assert corpus.vocab == tuple(sorted(set(everything)))
    assert [corpus.vocab[i] for i in corpus.tokens.tolist()] == everything
    n_train, n_valid = len(expected["train"]), len(expected["valid"])
    assert corpus.splits == {
        "train": (0, n_train),
        "valid": (n_train, n_train + n_valid),
        "test": (n_train + n_valid, len(everything)),
    }
    assert corpus.decode(corpus.split("valid")) == "consumers_may\n"


def test_ptb_char_errors(tmp_path: Path) -> None:
    write_ptb(tmp_path / "partial", {"train": PTB["train"], "valid": PTB["valid"]})
    with pytest.raises(UsageError) as excinfo:
        load_ptb_char(tmp_path / "partial")
    one_line_error(excinfo, "ptb.char.test.txt", str(tmp_path / "partial"))
    write_ptb(tmp_path / "words", {**PTB, "valid": "consumers may want to move their telephones\n"})
    with pytest.raises(UsageError) as excinfo:
        load_ptb_char(tmp_path / "words")
    one_line_error(excinfo, "ptb.char.valid.txt", "word-level")
    write_ptb(tmp_path / "ok", PTB)
    data = PTB["train"].encode()
    load_ptb_char(tmp_path / "ok", expected={"train": check(data)})
    with pytest.raises(UsageError) as excinfo:
        load_ptb_char(tmp_path / "ok", expected={"train": FileCheck(size=len(data) + 1)})
    one_line_error(excinfo, "ptb.char.train.txt", f"expected {len(data) + 1} bytes, found {len(data)} bytes")
    with pytest.raises(UsageError) as excinfo:
        load_ptb_char(tmp_path / "ok" / "ptb.char.train.txt")
    one_line_error(excinfo, "expected a folder")


# ---------------------------------------------------------------- plain text


def test_text_loader_unicode(tmp_path: Path) -> None:
    text = "Grüße, wörld ✓ — ça va?\n" * 10
    file = tmp_path / "any.txt"
    file.write_text(text, encoding="utf-8")
    corpus = load_text(file)
    assert corpus.vocab == tuple(sorted(set(text)))
    assert corpus.decode(corpus.tokens) == text
    n = len(text)
    assert corpus.splits == {"train": (0, n * 9 // 10), "valid": (n * 9 // 10, n * 19 // 20), "test": (n * 19 // 20, n)}
    assert corpus.decode(corpus.split("test")) == text[n * 19 // 20 :]


def test_text_loader_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"valid start then \xff\xfe invalid" * 3)
    with pytest.raises(UsageError) as excinfo:
        load_text(bad)
    one_line_error(excinfo, str(bad), "UTF-8", "offset 17")
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(UsageError) as excinfo:
        load_text(short)
    one_line_error(excinfo, str(short), "at least 20")
    with pytest.raises(UsageError) as excinfo:
        load_text(tmp_path / "missing.txt")
    one_line_error(excinfo, "not found", "missing.txt")


# ---------------------------------------------------------------- by name, as the task uses it


def test_load_corpus_by_name(tmp_path: Path) -> None:
    with pytest.raises(UsageError) as excinfo:
        load_corpus("wiki")
    one_line_error(excinfo, "'wiki'", "tinyshakespeare", "ptb-char", "text8", "enwik8", "text")
    with pytest.raises(UsageError) as excinfo:
        load_corpus("text8")
    one_line_error(excinfo, "'text8'", "path")
    file = tmp_path / "corpus.txt"
    file.write_text("abcabcabcabcabcabcabcabc")
    first = load_corpus("text", file)
    assert load_corpus("text", str(file)) is first  # cached
    file.write_text("xyzxyzxyzxyzxyzxyzxyzxyzxyz")
    os.utime(file, ns=(1, 1))
    assert load_corpus("text", file).vocab == ("x", "y", "z")  # a changed file is read again


def test_charlm_on_user_text(tmp_path: Path) -> None:
    file = tmp_path / "corpus.txt"
    text = "the quick brown fox jumps over the lazy dog. " * 20
    file.write_text(text)
    task = CharLMTask(corpus="text", path=file)
    assert task.input_size == len(set(text))
    stream = task.stream(2, "test")
    lo, hi = task.corpus.splits["test"]
    piece = text[lo:hi]
    N = (len(piece) - 1) // 2
    assert task.corpus.decode(stream.inputs[1]) == piece[N : 2 * N]
    assert task.corpus.decode(stream.targets[1]) == piece[N + 1 : 2 * N + 1]
