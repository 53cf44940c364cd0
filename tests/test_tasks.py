"""Built-in tasks: data layout, reproducibility, metrics and baselines against independent computations."""

from __future__ import annotations

import math
from collections import Counter
from importlib.resources import files

import numpy as np
import pytest
import scipy.stats
import torch
import torch.nn.functional as F

import tbptt_bench.tasks as tasks
from tbptt_bench.errors import UsageError
from tbptt_bench.tasks import TASKS
from tbptt_bench.tasks import AddingTask, Batch, CharLMTask, CopyTask, Task

TASK_NAMES = ["copy", "adding", "char-lm"]


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return files("tbptt_bench").joinpath("data/tinyshakespeare.txt").read_text(encoding="ascii")


@pytest.fixture(scope="module")
def shakespeare_ids(shakespeare_text: str) -> np.ndarray:
    vocab = sorted(set(shakespeare_text))
    index = {c: i for i, c in enumerate(vocab)}
    return np.array([index[c] for c in shakespeare_text], dtype=np.int64)


@pytest.fixture(scope="module")
def charlm() -> CharLMTask:
    return CharLMTask()


def make(name: str) -> Task:
    return TASKS.get(name)()


# ---------------------------------------------------------------- registry and protocol


def test_builtins_registered_and_exported() -> None:
    assert TASKS.get("copy") is CopyTask
    assert TASKS.get("adding") is AddingTask
    assert TASKS.get("char-lm") is CharLMTask
    assert tasks.Batch is Batch and tasks.Task is Task
    for name in TASK_NAMES:
        cls = TASKS.get(name)
        assert issubclass(cls, Task) and cls.name == name
        assert set(cls.tiny) == {"seq_len", "batch_size", "hidden_size"}


@pytest.mark.parametrize("name", TASK_NAMES)
def test_tiny_shapes_and_dtypes(name: str) -> None:
    task = make(name)
    T, B = task.tiny["seq_len"], task.tiny["batch_size"]
    batch = task.sample(B, T, gen(0))
    assert batch.batch_size == B and batch.length == T
    assert batch.weights.shape == (B, T) and batch.weights.dtype == torch.float32
    if task.input_kind == "tokens":
        assert batch.inputs.shape == (B, T) and batch.inputs.dtype == torch.int64
        assert int(batch.inputs.min()) >= 0 and int(batch.inputs.max()) < task.input_size
    else:
        assert batch.inputs.shape == (B, T, task.input_size) and batch.inputs.dtype == torch.float32
    if task.loss_kind == "cross_entropy":
        assert batch.targets.shape == (B, T) and batch.targets.dtype == torch.int64
        assert int(batch.targets.min()) >= 0 and int(batch.targets.max()) < task.output_size
    else:
        assert batch.targets.shape == (B, T, task.output_size) and batch.targets.dtype == torch.float32
    for t in (batch.inputs, batch.targets, batch.weights):
        assert t.device.type == "cpu"


@pytest.mark.parametrize("name", TASK_NAMES)
def test_seeded_reproducibility(name: str) -> None:
    task = make(name)
    T, B = task.tiny["seq_len"], task.tiny["batch_size"]
    a, b, c = task.sample(B, T, gen(7)), task.sample(B, T, gen(7)), task.sample(B, T, gen(8))
    for x, y in zip((a.inputs, a.targets, a.weights), (b.inputs, b.targets, b.weights)):
        assert torch.equal(x, y)
    assert not torch.equal(a.inputs, c.inputs)


@pytest.mark.parametrize("name", TASK_NAMES)
def test_unknown_split_and_bad_batch_size(name: str) -> None:
    task = make(name)
    T = task.tiny["seq_len"]
    with pytest.raises(UsageError, match="split"):
        task.sample(2, T, gen(0), split="dev")
    with pytest.raises(UsageError):
        task.sample(0, T, gen(0))


def test_batch_slice() -> None:
    batch = CopyTask().sample(3, 30, gen(1))
    part = batch.slice(5, 12)
    assert part.length == 7 and part.batch_size == 3
    assert torch.equal(part.inputs, batch.inputs[:, 5:12])
    assert torch.equal(part.targets, batch.targets[:, 5:12])
    assert torch.equal(part.weights, batch.weights[:, 5:12])
    pieces = [batch.slice(a, min(a + 8, 30)) for a in range(0, 30, 8)]
    assert torch.equal(torch.cat([p.inputs for p in pieces], dim=1), batch.inputs)


# ---------------------------------------------------------------- copy


def test_copy_layout_exact() -> None:
    T, B = 25, 5
    task = CopyTask()
    assert (task.input_size, task.output_size, task.marker) == (10, 9, 9)
    batch = task.sample(B, T, gen(3))
    for b in range(B):
        symbols = batch.inputs[b, :10].tolist()
        assert all(1 <= s <= 8 for s in symbols)
        expected_inputs = symbols + [0] * (T - 20 - 1) + [9] + [0] * 10
        expected_targets = [0] * (T - 10) + symbols
        assert batch.inputs[b].tolist() == expected_inputs
        assert batch.targets[b].tolist() == expected_targets
    assert torch.equal(batch.weights, torch.ones(B, T))


def test_copy_minimum_length() -> None:
    task = CopyTask()
    batch = task.sample(2, 21, gen(0))
    assert batch.inputs[:, 10].tolist() == [9, 9] and task.delay(21) == 1
    with pytest.raises(UsageError, match="21"):
        task.sample(2, 20, gen(0))
    with pytest.raises(UsageError, match="21"):
        task.baseline(20)


def test_copy_symbols_uniform() -> None:
    batch = CopyTask().sample(2000, 21, gen(4))
    counts = torch.bincount(batch.inputs[:, :10].reshape(-1), minlength=10)
    assert counts[0] == 0 and counts[9] == 0
    freq = counts[1:9].double() / 20000
    assert torch.allclose(freq, torch.full((8,), 1 / 8, dtype=torch.float64), atol=0.01)


def test_copy_metric_perfect_and_known() -> None:
    task = CopyTask()
    batch = task.sample(4, 30, gen(5))
    perfect = F.one_hot(batch.targets, 9).float()
    assert task.metric(perfect, batch) == 1.0
    half = perfect.clone()
    half[:, -5:] = F.one_hot(torch.zeros(4, 5, dtype=torch.int64), 9).float()  # blank: always wrong
    assert task.metric(half, batch) == pytest.approx(0.5)
    wrong_before_recall = perfect.clone()
    wrong_before_recall[:, :-10] = torch.randn(4, 20, 9)  # only the recall steps count
    assert task.metric(wrong_before_recall, batch) == 1.0


def test_copy_baseline_by_simulation() -> None:
    T, B = 21, 4000
    task = CopyTask()
    batch = task.sample(B, T, gen(6))
    guesses = torch.randint(1, 9, (B, 10), generator=gen(99))  # blind guesses on the recall steps
    logits = torch.zeros(B, T, 9)
    logits[:, :-10, 0] = 1.0
    logits[:, -10:] = F.one_hot(guesses, 9).float()
    simulated = task.metric(logits, batch)
    assert task.baseline(T) == 1 / 8
    assert abs(simulated - 1 / 8) < 0.01  # standard error ≈ 0.0017


@pytest.mark.parametrize("T", [21, 40, 120])
def test_copy_baseline_cross_entropy_exact(T: int) -> None:
    task = CopyTask()
    batch = task.sample(3, T, gen(2))
    log_p = torch.full((3, T, 9), -math.inf, dtype=torch.float64)
    log_p[:, : T - 10, 0] = 0.0  # certain blank
    log_p[:, T - 10 :, 1:] = -math.log(8)  # uniform over the 8 symbols
    per_step = F.nll_loss(log_p.reshape(-1, 9), batch.targets.reshape(-1), reduction="sum") / 3 / T
    assert task.baseline_cross_entropy(T) == pytest.approx(float(per_step), rel=1e-12)
    assert task.baseline_cross_entropy(T) == pytest.approx(10 * math.log(8) / T, rel=1e-12)


def test_copy_parameters() -> None:
    task = CopyTask(n_symbols=3, n_remember=2)
    assert (task.input_size, task.output_size, task.min_seq_len) == (5, 4, 5)
    batch = task.sample(2, 7, gen(0))
    for b in range(2):
        s = batch.inputs[b, :2].tolist()
        assert batch.inputs[b].tolist() == s + [0, 0, 4, 0, 0]
        assert batch.targets[b].tolist() == [0] * 5 + s
    assert task.baseline(7) == pytest.approx(1 / 3)
    with pytest.raises(UsageError):
        CopyTask(n_symbols=0)


# ---------------------------------------------------------------- adding


@pytest.mark.parametrize("T", [2, 7, 12])
def test_adding_markers_and_target(T: int) -> None:
    B = 300
    batch = AddingTask().sample(B, T, gen(T))
    values = batch.inputs[..., 0].numpy().astype(np.float64)
    markers = batch.inputs[..., 1].numpy()
    assert set(np.unique(markers)) <= {0.0, 1.0}
    assert values.min() >= 0.0 and values.max() < 1.0
    half = T // 2
    for b in range(B):
        marked = np.flatnonzero(markers[b])
        assert len(marked) == 2
        assert marked[0] < half <= marked[1]
        expected = values[b, marked[0]] + values[b, marked[1]]
        assert batch.targets[b, -1, 0].item() == pytest.approx(expected, abs=1e-6)
    expected_w = np.zeros((B, T), dtype=np.float32)
    expected_w[:, -1] = 1
    assert np.array_equal(batch.weights.numpy(), expected_w)
    if T > 2:  # every admissible position gets used
        assert set(np.flatnonzero(markers.sum(0))) == set(range(T))


def test_adding_too_short() -> None:
    with pytest.raises(UsageError, match="at least 2"):
        AddingTask().sample(2, 1, gen(0))


def test_adding_metric_perfect_and_known() -> None:
    task = AddingTask()
    batch = task.sample(6, 10, gen(1))
    assert task.metric(batch.targets.clone(), batch) == 0.0
    off = batch.targets + 0.1
    off[:, :-1] = 50.0  # unscored steps do not count
    assert task.metric(off, batch) == pytest.approx(0.01, rel=1e-5)


def test_adding_baseline_monte_carlo() -> None:
    task = AddingTask()
    batch = task.sample(100_000, 4, gen(11))
    constant = torch.ones_like(batch.targets)
    mse = task.metric(constant, batch)
    # the constant 1 scores 1/6; the memoryless optimum (tests/test_baselines.py) 1/6 − 1/(12·⌈T/2⌉)
    assert task.baseline(4) == pytest.approx(1 / 6 - 1 / 24, rel=1e-15)
    assert abs(mse - 1 / 6) < 0.003  # standard error ≈ 0.0006
    # and no constant does better: the mean of the target is 1
    assert float(batch.targets[:, -1, 0].double().mean()) == pytest.approx(1.0, abs=0.005)


# ---------------------------------------------------------------- char-lm


def test_charlm_vocabulary_and_splits(charlm: CharLMTask, shakespeare_text: str) -> None:
    assert list(charlm.vocab) == sorted(set(shakespeare_text))
    assert charlm.input_size == charlm.output_size == 65
    n = len(shakespeare_text)
    assert n == 1_115_394
    cut = int(0.9 * n)
    assert charlm.corpus.splits["train"] == (0, cut) == (0, 1_003_854)
    assert charlm.corpus.splits["valid"] == (cut, n)
    assert charlm.corpus.splits["test"] == charlm.corpus.splits["valid"]
    assert charlm.streaming is True


def test_charlm_sample_windows(charlm: CharLMTask, shakespeare_text: str) -> None:
    T = 30
    train = shakespeare_text[: int(0.9 * len(shakespeare_text))]
    valid = shakespeare_text[int(0.9 * len(shakespeare_text)) :]
    for split, text in (("train", train), ("valid", valid)):
        batch = charlm.sample(4, T, gen(3), split=split)
        assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
        for b in range(4):
            window = charlm.corpus.decode(batch.inputs[b]) + charlm.vocab[int(batch.targets[b, -1])]
            assert len(window) == T + 1 and window in text


def test_charlm_sample_window_offsets(tmp_path) -> None:
    file = tmp_path / "alphabet.txt"
    file.write_text("abcdefghijklmnopqrst")  # train split: the first 18 characters
    task = CharLMTask(corpus="text", path=file)
    only = task.sample(50, 17, gen(0))  # a window of 18 fits in exactly one place
    assert {task.corpus.decode(row) for row in only.inputs} == {"abcdefghijklmnopq"}
    assert {task.corpus.decode(row) for row in only.targets} == {"bcdefghijklmnopqr"}
    two = task.sample(200, 16, gen(0))  # both offsets, 0 and 1, are drawn
    assert {task.corpus.decode(row) for row in two.inputs} == {"abcdefghijklmnop", "bcdefghijklmnopq"}
    with pytest.raises(UsageError, match="at least seq_len"):
        task.sample(2, 18, gen(0))


def test_charlm_stream_layout(charlm: CharLMTask, shakespeare_ids: np.ndarray) -> None:
    n_train = int(0.9 * len(shakespeare_ids))
    valid = shakespeare_ids[n_train:]
    for split, ids in (("valid", valid), ("train", shakespeare_ids[:n_train])):
        B = 3
        stream = charlm.stream(B, split)
        N = (len(ids) - 1) // B
        assert stream.inputs.shape == stream.targets.shape == stream.weights.shape == (B, N)
        assert stream.inputs.dtype == stream.targets.dtype == torch.int64
        for b in range(B):
            assert np.array_equal(stream.inputs[b].numpy(), ids[b * N : (b + 1) * N])
            assert np.array_equal(stream.targets[b].numpy(), ids[b * N + 1 : (b + 1) * N + 1])
        assert float(stream.weights.sum()) == B * N
    chunk = stream.slice(100, 164)
    assert torch.equal(chunk.inputs, stream.inputs[:, 100:164])
    assert torch.equal(chunk.targets[:, :-1], chunk.inputs[:, 1:])


def test_charlm_stream_too_short(tmp_path) -> None:
    file = tmp_path / "small.txt"
    file.write_text("abcdefghijklmnopqrstuvwxyz" * 2)
    task = CharLMTask(corpus="text", path=file)
    n_valid = task.corpus.splits["valid"][1] - task.corpus.splits["valid"][0]
    assert n_valid == 52 * 19 // 20 - 52 * 9 // 10
    assert task.stream(n_valid - 1, "valid").length == 1
    with pytest.raises(UsageError, match="batch_size"):
        task.stream(n_valid, "valid")


def test_charlm_metric(charlm: CharLMTask) -> None:
    batch = charlm.sample(4, 16, gen(2))
    V = charlm.output_size
    uniform = torch.zeros(4, 16, V)
    assert charlm.metric(uniform, batch) == pytest.approx(math.log2(V), rel=1e-6)
    perfect = 30.0 * F.one_hot(batch.targets, V).float()
    assert charlm.metric(perfect, batch) < 1e-3
    # a known distribution: probability 1/2 on the target, the rest spread evenly → exactly 1 bit
    p = torch.full((4, 16, V), 0.5 / (V - 1))
    p.scatter_(-1, batch.targets[..., None], 0.5)
    assert charlm.metric(p.log(), batch) == pytest.approx(1.0, rel=1e-5)
    # unscored steps do not count
    masked = Batch(batch.inputs, batch.targets, batch.weights.clone())
    masked.weights[:, :8] = 0
    garbage = uniform.clone()
    garbage[:, :8] = -100.0 * F.one_hot(batch.targets[:, :8], V).float()
    assert charlm.metric(garbage, masked) == pytest.approx(math.log2(V), rel=1e-6)


def test_charlm_baseline_bigram_entropy(charlm: CharLMTask, shakespeare_text: str) -> None:
    """A memoryless predictor sees the current character: its best is the conditional entropy of the next one
    over the valid pairs (H(pair) − H(current)); ignoring the input too, the unigram entropy of the targets."""
    valid = shakespeare_text[int(0.9 * len(shakespeare_text)) :]
    pairs = list(Counter(zip(valid[:-1], valid[1:])).values())
    current = list(Counter(valid[:-1]).values())
    conditional = scipy.stats.entropy(pairs, base=2) - scipy.stats.entropy(current, base=2)
    assert charlm.baseline(16) == pytest.approx(float(conditional), rel=1e-12)
    targets = list(Counter(valid[1:]).values())
    assert charlm.baselines(16)[1].metric == pytest.approx(float(scipy.stats.entropy(targets, base=2)), rel=1e-12)


def test_charlm_unknown_corpus() -> None:
    with pytest.raises(UsageError, match="tinyshakespeare"):
        CharLMTask(corpus="wikitext")
    with pytest.raises(UsageError, match="path"):
        CharLMTask(corpus="enwik8")
