"""Character corpora: the bundled Tiny Shakespeare, and loaders for files the user supplies.

Every loader checks its file (size, and a checksum wherever the expected value is a documented fact)
before using it, and returns a :class:`Corpus`: the whole text as integer ids over a sorted vocabulary,
with named split ranges. Checks take an override (``expected=``) so that the same code can be tested on
small files and so that users can pin their own copies of files with no documented checksum.

Splits (see docs/tasks.md):

* ``tinyshakespeare``: first ``⌊0.9 n⌋`` characters train, the rest valid (nanoGPT's convention);
  ``test`` is the same range as ``valid`` because the corpus has no held-out test part.
* ``text8``, ``enwik8`` and any plain text file: first 90 %, next 5 %, last 5 %
  (for the real 100,000,000-unit files exactly 90M / 5M / 5M, the standard split).
* ``ptb-char``: the three files ``ptb.char.{train,valid,test}.txt`` as distributed.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.resources
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Mapping

import numpy as np
import torch

from tbptt_bench.errors import UsageError

log = logging.getLogger(__name__)

SPLITS: tuple[str, ...] = ("train", "valid", "test")
CORPUS_NAMES: tuple[str, ...] = ("tinyshakespeare", "ptb-char", "text8", "enwik8", "text")
PTB_CHAR_FILES: dict[str, str] = {
    "train": "ptb.char.train.txt",
    "valid": "ptb.char.valid.txt",
    "test": "ptb.char.test.txt",
}
#: The token that ends every line of the PTB-char files.
PTB_END_OF_LINE = "\n"

_CHUNK = 1 << 24


@dataclass(frozen=True)
class FileCheck:
    """What a file must be: its size in bytes and, only where known for certain, its checksums."""

    size: int | None = None
    md5: str | None = None
    sha256: str | None = None


#: Documented facts about the standard files (the uncompressed content). A checksum is listed only where
#: it is known for certain: text8's is not, so text8 is verified by size alone; no fact about the PTB-char
#: files is listed, so they are checked for presence and format only unless the caller passes ``expected``.
KNOWN_FILES: dict[str, FileCheck] = {
    "tinyshakespeare.txt": FileCheck(
        size=1_115_394,
        md5="6fb458f1232090904fb40fe944165e91",
        sha256="86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
    ),
    "enwik8": FileCheck(size=100_000_000, md5="a1fa5ffddb56f4953e226637dabbb36a"),
    "text8": FileCheck(size=100_000_000),
}


@dataclass(frozen=True, eq=False)
class Corpus:
    """A tokenised corpus: ``tokens`` are 1-D compact integer ids into ``vocab``; ``splits`` are ranges.

    ``vocab`` is sorted and holds one string per id: a character, a byte read as Latin-1 (enwik8), or a
    PTB-char symbol. ``splits[name] = (start, end)`` is a half-open range of ``tokens``.
    """

    name: str
    vocab: tuple[str, ...]
    tokens: torch.Tensor
    splits: Mapping[str, tuple[int, int]]

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def split(self, name: str) -> torch.Tensor:
        """The split's ids (a view of ``tokens``, compact dtype; do not modify)."""
        if name not in self.splits:
            raise UsageError(f"unknown split {name!r} for corpus {self.name!r}; accepted: {', '.join(self.splits)}")
        start, end = self.splits[name]
        return self.tokens[start:end]

    def counts(self, name: str) -> np.ndarray:
        """How often each id occurs in the split: int64 ``[vocab_size]``."""
        counts = _chunked_bincount(self.split(name).numpy())
        return np.pad(counts, (0, self.vocab_size - len(counts)))

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        """The text of a sequence of ids (for looking at samples)."""
        values = ids.tolist() if isinstance(ids, torch.Tensor) else ids
        return "".join(self.vocab[i] for i in values)


def verify_bytes(data: bytes, source: str, expected: FileCheck) -> None:
    """Raise :class:`UsageError` (one line naming ``source``) unless ``data`` matches ``expected``."""
    if expected.size is not None and len(data) != expected.size:
        raise UsageError(f"{source}: expected {expected.size:,} bytes, found {len(data):,} bytes")
    for algorithm in ("md5", "sha256"):
        want = getattr(expected, algorithm)
        if want is None:
            continue
        found = hashlib.new(algorithm, data).hexdigest()
        if found != want.lower():
            raise UsageError(f"{source}: expected {algorithm} {want.lower()}, found {found}")


def _read_file(path: Path, what: str) -> bytes:
    if not path.is_file():
        raise UsageError(f"{what}: file not found: {path}")
    return path.read_bytes()


def read_named_file(path: str | os.PathLike[str], filename: str) -> tuple[bytes, str]:
    """Read ``filename`` from ``path``: the file itself, a folder holding it (or ``filename.zip``), or a zip.

    Returns the bytes and a description of where they came from, for messages.
    """
    p = Path(path).expanduser()
    if p.is_dir():
        for candidate in (p / filename, p / f"{filename}.zip"):
            if candidate.is_file():
                p = candidate
                break
        else:
            raise UsageError(f"{filename}: folder {p} holds neither {filename} nor {filename}.zip")
    if not p.exists():
        raise UsageError(f"{filename}: file not found: {p}")
    if zipfile.is_zipfile(p):
        with zipfile.ZipFile(p) as archive:
            if filename not in archive.namelist():
                raise UsageError(f"{filename}: zip archive {p} has no member {filename!r}")
            return archive.read(filename), f"{p}!{filename}"
    return _read_file(p, filename), str(p)


def _chunked_bincount(codes: np.ndarray) -> np.ndarray:
    counts = np.zeros(0, dtype=np.int64)
    for i in range(0, len(codes), _CHUNK):
        part = np.bincount(codes[i : i + _CHUNK])
        if len(part) > len(counts):
            part[: len(counts)] += counts
            counts = part
        else:
            counts[: len(part)] += part
    return counts


def _compact_dtype(vocab_size: int) -> np.dtype:
    if vocab_size <= 256:
        return np.dtype(np.uint8)
    if vocab_size <= 32767:
        return np.dtype(np.int16)
    return np.dtype(np.int32)


def _encode_codes(codes: np.ndarray) -> tuple[tuple[str, ...], torch.Tensor]:
    """Map code points to ids over the sorted set of code points present."""
    counts = _chunked_bincount(codes)
    present = np.flatnonzero(counts)
    dtype = _compact_dtype(len(present))
    lookup = np.zeros(len(counts), dtype=dtype)
    lookup[present] = np.arange(len(present), dtype=dtype)
    ids = np.empty(len(codes), dtype=dtype)
    for i in range(0, len(codes), _CHUNK):
        ids[i : i + _CHUNK] = lookup[codes[i : i + _CHUNK]]
    vocab = tuple(chr(int(c)) for c in present)
    return vocab, torch.from_numpy(ids)


def _codes(data: bytes, source: str, unit: Literal["bytes", "chars"]) -> np.ndarray:
    """Code points of the data: bytes as they are, or UTF-8 text decoded to characters."""
    if unit == "bytes" or data.isascii():
        return np.frombuffer(data, dtype=np.uint8)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{source}: expected UTF-8 text, found an invalid byte at offset {exc.start}") from None
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")


def fraction_splits(n: int) -> dict[str, tuple[int, int]]:
    """First 90 %, next 5 %, last 5 % (integer arithmetic: 90M / 5M / 5M for n = 10^8)."""
    a, b = n * 9 // 10, n * 19 // 20
    return {"train": (0, a), "valid": (a, b), "test": (b, n)}


def _corpus(name: str, data: bytes, source: str, unit: Literal["bytes", "chars"], min_size: int = 2) -> Corpus:
    vocab, tokens = _encode_codes(_codes(data, source, unit))
    if len(tokens) < min_size:
        raise UsageError(f"{source}: expected at least {min_size} characters of text, found {len(tokens)}")
    return Corpus(name, vocab, tokens, fraction_splits(len(tokens)))


def load_tinyshakespeare(path: str | os.PathLike[str] | None = None, expected: FileCheck | None = None) -> Corpus:
    """Tiny Shakespeare: the bundled copy (package data), or a copy at ``path``; sha256 and size checked."""
    if path is None:
        resource = importlib.resources.files("tbptt_bench").joinpath("data/tinyshakespeare.txt")
        data, source = resource.read_bytes(), "bundled tinyshakespeare.txt"
    else:
        data, source = read_named_file(path, "tinyshakespeare.txt")
    verify_bytes(data, source, KNOWN_FILES["tinyshakespeare.txt"] if expected is None else expected)
    vocab, tokens = _encode_codes(_codes(data, source, "chars"))
    n = len(tokens)
    cut = n * 9 // 10
    return Corpus("tinyshakespeare", vocab, tokens, {"train": (0, cut), "valid": (cut, n), "test": (cut, n)})


def load_text8(path: str | os.PathLike[str], expected: FileCheck | None = None) -> Corpus:
    """text8 (``text8`` or ``text8.zip``, or a folder holding one): size checked; 90/5/5 split."""
    data, source = read_named_file(path, "text8")
    verify_bytes(data, source, KNOWN_FILES["text8"] if expected is None else expected)
    return _corpus("text8", data, source, "bytes")


def load_enwik8(path: str | os.PathLike[str], expected: FileCheck | None = None) -> Corpus:
    """enwik8 (``enwik8`` or ``enwik8.zip``, or a folder holding one): size and md5 checked; 90/5/5 split of bytes."""
    data, source = read_named_file(path, "enwik8")
    verify_bytes(data, source, KNOWN_FILES["enwik8"] if expected is None else expected)
    return _corpus("enwik8", data, source, "bytes")


def load_text(path: str | os.PathLike[str], expected: FileCheck | None = None) -> Corpus:
    """Any UTF-8 plain text file, as characters; checked against ``expected`` if given; 90/5/5 split."""
    p = Path(path).expanduser()
    data = _read_file(p, "text corpus")
    if expected is not None:
        verify_bytes(data, str(p), expected)
    return _corpus("text", data, str(p), "chars", min_size=20)


def _ptb_folder(path: Path) -> Path:
    for folder in (path, path / "data"):
        if all((folder / f).is_file() for f in PTB_CHAR_FILES.values()):
            return folder
    missing = [f for f in PTB_CHAR_FILES.values() if not (path / f).is_file()]
    raise UsageError(f"ptb-char: folder {path} (or {path / 'data'}) lacks {', '.join(missing)}")


def load_ptb_char(path: str | os.PathLike[str], expected: Mapping[str, FileCheck] | None = None) -> Corpus:
    """PTB-char: the folder with Mikolov's ``ptb.char.{train,valid,test}.txt`` (or its ``data/`` subfolder).

    Symbols are separated by whitespace (``_`` marks word boundaries); every line ends with the token
    ``"\\n"``. ``expected`` maps split names to checks (no checksum of these files is documented here).
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise UsageError(f"ptb-char: expected a folder holding {', '.join(PTB_CHAR_FILES.values())}, found {p}")
    folder = _ptb_folder(p)
    symbols: list[str] = []
    bounds: dict[str, tuple[int, int]] = {}
    for split, filename in PTB_CHAR_FILES.items():
        file = folder / filename
        data = _read_file(file, "ptb-char")
        if expected is not None and split in expected:
            verify_bytes(data, str(file), expected[split])
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"{file}: expected UTF-8 text, found an invalid byte at offset {exc.start}") from None
        start = len(symbols)
        for line in text.splitlines():
            symbols.extend(line.split())
            symbols.append(PTB_END_OF_LINE)
        if len(symbols) - start < 2:
            raise UsageError(f"{file}: expected space-separated characters, found {len(symbols) - start} symbols")
        long_symbols = sum(1 for s in symbols[start:] if len(s) > 1)
        if long_symbols * 2 > len(symbols) - start:
            raise UsageError(
                f"{file}: expected space-separated characters, found mostly multi-character words "
                "(is it the word-level ptb file?)"
            )
        bounds[split] = (start, len(symbols))
    vocab = tuple(sorted(set(symbols)))
    index = {s: i for i, s in enumerate(vocab)}
    ids = np.fromiter((index[s] for s in symbols), dtype=_compact_dtype(len(vocab)), count=len(symbols))
    return Corpus("ptb-char", vocab, torch.from_numpy(ids), bounds)


def _stamp(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, path: str | None, stamp: tuple[int, int] | None) -> Corpus:
    del stamp  # part of the cache key only: a changed file is loaded again
    if name == "tinyshakespeare":
        return load_tinyshakespeare(path)
    if path is None:
        raise UsageError(f"corpus {name!r} needs the parameter path: a local file or folder")
    loaders = {"ptb-char": load_ptb_char, "text8": load_text8, "enwik8": load_enwik8, "text": load_text}
    return loaders[name](path)


def load_corpus(name: str, path: str | os.PathLike[str] | None = None) -> Corpus:
    """Load a corpus by name with its documented checks; recent loads are cached in the process."""
    if name not in CORPUS_NAMES:
        raise UsageError(f"unknown corpus {name!r}; accepted: {', '.join(CORPUS_NAMES)}")
    resolved = None if path is None else str(Path(path).expanduser().resolve())
    corpus = _load_cached(name, resolved, None if resolved is None else _stamp(Path(resolved)))
    log.info("corpus %s: %d tokens, vocabulary %d", name, len(corpus.tokens), corpus.vocab_size)
    return corpus
