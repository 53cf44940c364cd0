"""Every declared baseline against the fixed predictor it describes, scored by the training loop's evaluation.

Each predictor is a tiny module that follows the model protocol (``initial_state`` / ``forward``); the
memoryless ones ignore their state. ``training.evaluate`` scores it on held-out data exactly as it scores a
trained model (``eval_loss`` per scored step, ``eval_metric``). Deterministic quantities must match the
closed form to rounding; random ones within 4 Monte-Carlo standard errors (computed from the predictor's
per-step variance, plus a term for the edges of finite streams). Perturbed memoryless predictors, scored on
the same data, must not beat the memoryless optimum.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch
from torch import nn

from tbptt_bench.tasks.adding import CONSTANT, AddingTask
from tbptt_bench.tasks.base import MEMORYLESS_OPTIMUM, Baseline, Batch, Task
from tbptt_bench.tasks.charlm import TRAIN_UNIGRAM, UNIGRAM, CharLMTask
from tbptt_bench.tasks.copy import MEMORYLESS_BEST_ACCURACY, CopyTask
from tbptt_bench.tasks.copy import TIMING_AWARE as COPY_TIMING
from tbptt_bench.tasks.copystream import TIMING_AWARE as ECHO_TIMING
from tbptt_bench.tasks.copystream import CopyStreamTask
from tbptt_bench.training.loop import TrainConfig, evaluate

CPU, F64 = torch.device("cpu"), torch.float64
#: The logit of an impossible class: exp(−10⁴) is 0 in float64, so it acts as −∞ on scored steps, but an
#: unscored step (weight 0) whose target it is costs 0 · 10⁴ = 0 instead of 0 · ∞ = NaN.
NEVER = -1e4


def score(model: nn.Module, task: Task, seq_len: int, batch_size: int, eval_batches: int) -> dict[str, float]:
    """The held-out loss per scored step and metric that training reports, for this fixed predictor."""
    cfg = TrainConfig(seq_len=seq_len, batch_size=batch_size, eval_batches=eval_batches, seed=0)
    return evaluate(model, task, cfg, CPU, F64)


def named(baselines: tuple[Baseline, ...], name: str) -> Baseline:
    (found,) = [b for b in baselines if b.name == name]
    return found


def log(p: float) -> float:
    return math.log(p) if p > 0 else NEVER


class Table(nn.Module):
    """Memoryless: the logits at step t are a row of a fixed table, chosen by the input token at step t."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("logits", logits.to(F64))

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(1, batch_size, 1, dtype=F64)

    def forward(self, inputs: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.logits[inputs], state


class Flagged(nn.Module):
    """One bit of memory: logits ``on`` where the bit is set at step t, ``off`` elsewhere (each a table by input).

    ``copy``: the bit is "a marker came before step t". ``echo``: "the input at step t − 1 was not blank".
    """

    def __init__(self, kind: str, off: torch.Tensor, on: torch.Tensor, marker: int = 0) -> None:
        super().__init__()
        self.kind, self.marker = kind, marker
        self.register_buffer("off", off.to(F64))
        self.register_buffer("on", on.to(F64))

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(1, batch_size, 1, dtype=F64)

    def forward(self, inputs: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        carried = state[0, :, 0] > 0
        if self.kind == "copy":
            hit = (inputs == self.marker).long()
            flag = carried[:, None] | ((hit.cumsum(1) - hit) > 0)
            last = flag[:, -1] | (hit[:, -1] > 0)
        else:
            previous = torch.cat([carried[:, None], inputs[:, :-1] != 0], dim=1)
            flag, last = previous, inputs[:, -1] != 0
        out = torch.where(flag[..., None], self.on[inputs], self.off[inputs])
        return out, last.to(F64)[None, :, None]


class Affine(nn.Module):
    """Memoryless, for the adding task: ``c0 + c1·v + m·(c2 + c3·v)`` from the value v and marker m at step t."""

    def __init__(self, c0: float, c1: float = 0.0, c2: float = 0.0, c3: float = 0.0) -> None:
        super().__init__()
        self.c = (c0, c1, c2, c3)

    def initial_state(self, batch_size: int) -> torch.Tensor:
        return torch.zeros(1, batch_size, 1, dtype=F64)

    def forward(self, inputs: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        v, m = inputs[..., 0].to(F64), inputs[..., 1].to(F64)
        c0, c1, c2, c3 = self.c
        return (c0 + c1 * v + m * (c2 + c3 * v))[..., None], state


def within(measured: float, expected: float, se: float, slack: float = 0.0) -> None:
    assert abs(measured - expected) <= 4 * se + slack + 1e-12, (measured, expected, se)


def accuracy_se(p: float, n: float) -> float:
    return math.sqrt(p * (1 - p) / n)


# ---------------------------------------------------------------- copy

COPY_CASES = [({}, 21), ({}, 22), ({}, 24), ({}, 64), ({"n_symbols": 3, "n_remember": 2}, 9),
              ({"n_symbols": 1, "n_remember": 3}, 12)]
COPY_B, COPY_BATCHES = 1024, 2


def copy_tables(task: CopyTask, seq_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """(logits before the marker has passed, logits after) for each baseline, as log-probabilities."""
    n, k = task.n_symbols, task.n_remember
    q, pool = task.delay(seq_len) - 1, task.delay(seq_len) - 1 + k
    certain_blank = torch.full((task.input_size, task.output_size), NEVER, dtype=F64)
    certain_blank[:, 0] = 0.0
    optimum = certain_blank.clone()
    optimum[0, 0] = log(q / pool)
    optimum[0, 1:] = log(k / (n * pool))
    best = optimum.clone()
    if q * n >= k:  # a symbol ties blank at the top, lifted by a hair so that it wins the arg-max
        a = (q + k / n) / (2 * pool)
        best[0, 0], best[0, 1] = math.log(a), math.log(a) + 1e-12
    uniform = certain_blank.clone()
    uniform[0, 0], uniform[0, 1:] = NEVER, -math.log(n)
    return {MEMORYLESS_OPTIMUM: (optimum, optimum), MEMORYLESS_BEST_ACCURACY: (best, best),
            COPY_TIMING: (certain_blank, uniform)}


@pytest.mark.parametrize("params,seq_len", COPY_CASES)
def test_copy_baselines_scored_by_the_evaluation(params: dict, seq_len: int) -> None:
    task = CopyTask(**params)
    n, k = task.n_symbols, task.n_remember
    declared = task.baselines(seq_len)
    assert [b.name for b in declared] == [MEMORYLESS_OPTIMUM, MEMORYLESS_BEST_ACCURACY, COPY_TIMING]
    assert [b.memoryless for b in declared] == [True, True, False]
    sequences = COPY_B * COPY_BATCHES
    for name, (off, on) in copy_tables(task, seq_len).items():
        expected = named(declared, name)
        model = Table(off) if on is off else Flagged("copy", off, on, task.marker)
        got = score(model, task, seq_len, COPY_B, COPY_BATCHES)
        # The loss varies only with which symbols the k recall steps hold (blank input, uniform target).
        recall_log_p = on[0, 1:]
        spread = float(recall_log_p.var(unbiased=False)) if n > 1 else 0.0
        within(got["eval_loss"], expected.loss, math.sqrt(k * spread / sequences) / seq_len, 1e-9)
        predicted = int(on[0].argmax())
        if predicted == 0:  # blank on the recall steps: never right
            assert got["eval_metric"] == expected.metric == 0.0
        else:
            within(got["eval_metric"], expected.metric, accuracy_se(1 / n, k * sequences))
    assert task.baseline(seq_len) == 1 / n
    assert task.baseline_cross_entropy(seq_len) == named(declared, COPY_TIMING).loss


def test_copy_closed_forms_at_the_documented_settings() -> None:
    """The numbers docs/tasks.md quotes (T = 64 default, 24 quick suite), and the order of the three losses."""
    task = CopyTask()
    for seq_len, optimum, best in [(64, 0.72598, 1.11631), (24, 1.15904, 1.17451)]:
        b = task.baselines(seq_len)
        assert b[0].loss == pytest.approx(optimum, abs=5e-6) and b[0].metric == 0.0
        assert b[1].loss == pytest.approx(best, abs=5e-6) and b[1].metric == 1 / 8
        assert b[2].loss == pytest.approx(10 * math.log(8) / seq_len, rel=1e-15)
        assert b[2].loss < b[0].loss < b[1].loss
    at_21 = task.baselines(21)  # no blank-input delay step: blank input means recall, so no timing is needed
    assert at_21[0].loss == pytest.approx(at_21[2].loss, rel=1e-12) and at_21[0].metric == 1 / 8


def test_no_memoryless_copy_predictor_beats_the_optimum() -> None:
    task, seq_len = CopyTask(), 40
    optimum, _ = copy_tables(task, seq_len)[MEMORYLESS_OPTIMUM]
    best = score(Table(optimum), task, seq_len, COPY_B, COPY_BATCHES)["eval_loss"]
    assert best == pytest.approx(task.baselines(seq_len)[0].loss, rel=1e-9)
    noise = torch.Generator().manual_seed(1)
    for scale in (0.05, 0.3, 1.0):
        perturbed = optimum.clone()
        perturbed[0] += scale * torch.randn(task.output_size, generator=noise, dtype=F64)
        assert score(Table(perturbed), task, seq_len, COPY_B, COPY_BATCHES)["eval_loss"] > best
    sure = optimum.clone()
    sure[1:, 0] = 8.0  # softer "blank" on the symbol and marker inputs
    sure[1:, 1:] = 0.0
    assert score(Table(sure), task, seq_len, COPY_B, COPY_BATCHES)["eval_loss"] > best


# ---------------------------------------------------------------- adding

ADD_B, ADD_BATCHES = 8192, 4


def adding_se(p_marked: float, mean: float, optimum: bool, n: int) -> float:
    """Standard error of the mean squared error: E[e⁴] is 1/80 (uniform error), 1/15 (triangular error)."""
    fourth = p_marked / 80 + (1 - p_marked) / 15 if optimum else 1 / 15
    return math.sqrt((fourth - mean**2) / n)


@pytest.mark.parametrize("seq_len", [2, 3, 12, 24, 64])
def test_adding_baselines_scored_by_the_evaluation(seq_len: int) -> None:
    task = AddingTask()
    declared = task.baselines(seq_len)
    assert [b.name for b in declared] == [MEMORYLESS_OPTIMUM, CONSTANT] and all(b.memoryless for b in declared)
    p = 1 / math.ceil(seq_len / 2)
    assert declared[0].metric == pytest.approx(1 / 6 - p / 12, rel=1e-14) and declared[1].metric == 1 / 6
    n = ADD_B * ADD_BATCHES
    for baseline, model, is_optimum in [(declared[0], Affine(1.0, 0.0, -0.5, 1.0), True),
                                        (declared[1], Affine(1.0), False)]:
        got = score(model, task, seq_len, ADD_B, ADD_BATCHES)
        se = adding_se(p, baseline.metric, is_optimum, n)
        within(got["eval_metric"], baseline.metric, se)
        assert got["eval_loss"] == pytest.approx(got["eval_metric"], rel=1e-12)  # one scored step: loss = MSE
        assert baseline.loss == baseline.metric
    assert task.baseline(seq_len) == declared[0].metric


def test_adding_optimum_below_the_constant_by_more_than_the_noise() -> None:
    """At T = 12 the gap 1/72 is many standard errors: the evaluation tells the two apart."""
    task = AddingTask()
    optimum = score(Affine(1.0, 0.0, -0.5, 1.0), task, 12, ADD_B, ADD_BATCHES)["eval_metric"]
    constant = score(Affine(1.0), task, 12, ADD_B, ADD_BATCHES)["eval_metric"]
    assert constant - optimum > 0.8 / 72


@pytest.mark.parametrize("seq_len", [4, 24])
def test_no_memoryless_adding_predictor_beats_the_optimum(seq_len: int) -> None:
    task = AddingTask()
    best = score(Affine(1.0, 0.0, -0.5, 1.0), task, seq_len, ADD_B, ADD_BATCHES)["eval_metric"]
    for c in [(1.1, 0.0, -0.5, 1.0), (0.9, 0.0, -0.5, 1.0), (1.0, 0.1, -0.5, 1.0), (1.0, -0.1, -0.5, 1.0),
              (1.0, 0.0, -0.4, 1.0), (1.0, 0.0, -0.5, 0.8), (0.95, 0.1, -0.55, 1.1)]:
        assert score(Affine(*c), task, seq_len, ADD_B, ADD_BATCHES)["eval_metric"] > best


# ---------------------------------------------------------------- copy-stream

STREAM_ROWS, STREAM_SEQ, STREAM_BATCHES = 16, 1000, 20  # 20 000 steps on each of 16 streams


def stream_task(**params) -> CopyStreamTask:
    return CopyStreamTask(valid_length=STREAM_SEQ * STREAM_BATCHES, **params)


def test_copystream_delay_baseline_scored_by_the_evaluation() -> None:
    task = stream_task(lag=10)
    (declared,) = task.baselines(0)
    assert declared.name == MEMORYLESS_OPTIMUM and declared.metric == 1 / 6 == task.baseline(0)
    got = score(Table(torch.zeros(6, 6)), task, STREAM_SEQ, STREAM_ROWS, STREAM_BATCHES)
    assert got["eval_loss"] == pytest.approx(math.log(6), rel=1e-12) == declared.loss  # uniform: always ln 6
    scored = STREAM_ROWS * (STREAM_SEQ * STREAM_BATCHES - 10)
    within(got["eval_metric"], declared.metric, accuracy_se(1 / 6, scored))


def echo_tables(task: CopyStreamTask, timing: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n, r = task.n_symbols, 2 / (task.min_lag + task.lag)
    off = torch.full((n, n), NEVER, dtype=F64)
    off[1:, 0] = 0.0  # a marker or data input: the target is blank
    off[0, 1], off[0, 2:] = log(r), log((1 - r) / (n - 2))
    if not timing:
        return off, off
    on = off.clone()  # the first echo step: the marker
    on[0, 1], on[0, 2:] = 0.0, NEVER
    off[0, 1], off[0, 2:] = NEVER, -math.log(n - 2)
    return off, on


@pytest.mark.parametrize("params", [{"lag": 10}, {"lag": 10, "min_lag": 5}, {"lag": 4, "n_symbols": 4}])
def test_copystream_blocks_baselines_scored_by_the_evaluation(params: dict) -> None:
    task = stream_task(layout="blocks", **params)
    declared = task.baselines(0)
    assert [b.name for b in declared] == [MEMORYLESS_OPTIMUM, ECHO_TIMING]
    assert task.baseline(0) == declared[0].metric
    steps = STREAM_ROWS * STREAM_SEQ * STREAM_BATCHES
    edge = 4 * task.lag / (STREAM_SEQ * STREAM_BATCHES)  # partial blocks at both ends of each stream
    for expected, timing in zip(declared, (False, True)):
        off, on = echo_tables(task, timing)
        model = Flagged("echo", off, on) if timing else Table(off)
        got = score(model, task, STREAM_SEQ, STREAM_ROWS, STREAM_BATCHES)
        # Every data symbol costs the same, so the loss moves only with the share r of markers among echoes
        # (blocks / Σ L, a renewal count: relative error ≈ (sd L / E L) / √blocks), at slope |d loss / d r|.
        mean, sd = (task.min_lag + task.lag) / 2, math.sqrt(((task.lag - task.min_lag + 1) ** 2 - 1) / 12)
        d = task.n_symbols - 2
        slope = math.log(d) / 2 if timing else abs(math.log((1 - 1 / mean) / (d / mean))) / 2
        loss_se = slope * (sd / mean) / mean / math.sqrt(steps / (2 * mean))
        within(got["eval_loss"], expected.loss, loss_se, edge * expected.loss)
        within(got["eval_metric"], expected.metric, accuracy_se(expected.metric, steps / 2), edge)


def test_copystream_quoted_numbers() -> None:
    blocks = CopyStreamTask(layout="blocks").baselines(0)
    assert (blocks[0].metric, blocks[1].metric) == pytest.approx((0.225, 0.325), abs=1e-15)
    assert blocks[0].loss == pytest.approx(0.78637, abs=5e-6) and blocks[1].loss == pytest.approx(0.62383, abs=5e-6)


# ---------------------------------------------------------------- char-lm


@pytest.fixture(scope="module")
def charlm() -> CharLMTask:
    return CharLMTask()


@pytest.fixture(scope="module")
def valid_pairs(charlm: CharLMTask) -> np.ndarray:
    """Counts of (current, next) character pairs in the valid text, from the decoded text itself."""
    text = charlm.corpus.decode(charlm.corpus.split("valid"))
    index = {c: i for i, c in enumerate(charlm.vocab)}
    ids = np.array([index[c] for c in text])
    counts = np.zeros((charlm.input_size, charlm.input_size), dtype=np.int64)
    np.add.at(counts, (ids[:-1], ids[1:]), 1)
    return counts


def score_whole_valid(task: CharLMTask, log_p: np.ndarray) -> dict[str, float]:
    """One stream (B = 1) read whole in one segment: every valid character but the last is an input, scored
    on the next. ``log_p`` is one row of logits for every input, or a table ``[input, next]``."""
    n = len(task.corpus.split("valid"))
    table = torch.as_tensor(log_p, dtype=F64).expand(task.input_size, -1)
    return score(Table(table), task, n - 1, 1, 1)


def log_frequencies(counts: np.ndarray) -> np.ndarray:
    """Row-wise log relative frequencies; NEVER where a count is 0; a row of zeros gives uniform logits."""
    counts = counts.astype(np.float64)
    total = counts.sum(axis=-1, keepdims=True)
    p = counts / np.where(total > 0, total, 1.0)
    return np.where(total == 0, 0.0, np.where(p > 0, np.log(np.where(p > 0, p, 1.0)), NEVER))


def test_charlm_baselines_scored_by_the_evaluation(charlm: CharLMTask, valid_pairs: np.ndarray) -> None:
    declared = charlm.baselines(64)
    assert [b.name for b in declared] == [MEMORYLESS_OPTIMUM, UNIGRAM, TRAIN_UNIGRAM]
    tables = (log_frequencies(valid_pairs), log_frequencies(valid_pairs.sum(axis=0)),
              log_frequencies(charlm.corpus.counts("train")))
    for baseline, table in zip(declared, tables):
        got = score_whole_valid(charlm, table)
        assert got["eval_metric"] == pytest.approx(baseline.metric, rel=1e-9)
        assert got["eval_loss"] == pytest.approx(baseline.loss, rel=1e-9)
    assert charlm.baseline(64) == declared[0].metric
    quoted = [3.42422, 4.81469, 4.82914]  # docs/tasks.md
    assert [b.metric for b in declared] == pytest.approx(quoted, abs=5e-6)
    train_ids = charlm.corpus.split("train").numpy().astype(np.int64)
    v = charlm.input_size
    train_pairs = np.bincount(train_ids[:-1] * v + train_ids[1:], minlength=v * v).reshape(v, v)
    unseen = (train_pairs == 0) & (valid_pairs > 0)  # why docs/tasks.md gives no train-fit bigram line
    assert (int(valid_pairs[unseen].sum()), int(unseen.sum())) == (187, 23)


def test_no_memoryless_charlm_predictor_beats_the_optimum(charlm: CharLMTask, valid_pairs: np.ndarray) -> None:
    optimum = log_frequencies(valid_pairs)
    best = score_whole_valid(charlm, optimum)["eval_loss"]
    noise = np.random.default_rng(2)
    for scale in (0.01, 0.1, 1.0):
        perturbed = optimum + scale * noise.standard_normal(optimum.shape)
        assert score_whole_valid(charlm, perturbed)["eval_loss"] > best
    smoothed = log_frequencies(valid_pairs + 1)  # add-one smoothing
    assert score_whole_valid(charlm, smoothed)["eval_loss"] > best


# ---------------------------------------------------------------- the protocol


def test_a_task_declaring_only_baseline_gets_it_as_its_memoryless_optimum() -> None:
    class Coin(Task):
        name, input_kind, loss_kind, metric_name, metric_higher_is_better = "coin", "tokens", "mse", "acc", True
        input_size = output_size = 2

        def sample(self, batch_size, seq_len, generator, split="train"):  # pragma: no cover - not called
            return Batch(torch.zeros(1), torch.zeros(1), torch.zeros(1))

        def metric(self, outputs, batch):  # pragma: no cover - not called
            return 0.0

        def baseline(self, seq_len):
            return 0.5

    (only,) = Coin().baselines(10)
    assert (only.name, only.metric, only.loss, only.memoryless) == (MEMORYLESS_OPTIMUM, 0.5, None, True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        only.metric = 1.0  # frozen
