"""User-defined methods: from an updates function or a mask, registered from a plugin folder."""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
import torch

from tbptt_bench.cli import main
from tbptt_bench.methods.custom import define_method, updates_from_mask
from tbptt_bench.errors import UsageError
from tbptt_bench.analysis.gradients import method_gradient
from tbptt_bench.core.mask import Update, mask_matrix
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.recurrent import RecurrentNet
from tbptt_bench.registry import add_plugin_dirs
from tbptt_bench.tasks.base import Batch
from tbptt_bench.training.loop import TrainConfig, train

from reference import masked_reference

PLUGIN = '''
from tbptt_bench.methods.custom import (Window, define_mask_method, define_method, per_update_windows,
                                        positive_int, real)


@define_method("user-doubling", summary="chunked, K doubled every `every` updates",
               params={"k": positive_int(), "every": positive_int()},
               k_used=lambda update, k, every: k << (update // every))
def doubling(length, first_update, rng, k, every):
    return per_update_windows(length, first_update, lambda n: Window(k << (n // every), k << (n // every)))


@define_mask_method("user-decay", summary="chunks of k, lag d weighted by rho**d",
                    params={"rho": real(0, 1), "k": positive_int()}, every="k")
def decay(t, s, rho, k):
    return rho ** (t - s) if s >= (t // k) * k else 0.0
'''


@pytest.fixture(scope="module")
def plugin_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user_methods")
    (folder / "my_methods.py").write_text(textwrap.dedent(PLUGIN))
    add_plugin_dirs([folder])
    return folder


def tiny(T=10, B=2, seed=0):
    torch.manual_seed(seed)
    model = RecurrentNet("lstm", "tokens", 5, 5, 4, 1).double()
    g = torch.Generator().manual_seed(seed)
    batch = Batch(torch.randint(0, 5, (B, T), generator=g), torch.randint(0, 5, (B, T), generator=g),
                  torch.ones(B, T, dtype=torch.float64))
    return model, batch


def test_mask_method_from_plugin_matches_reference_with_the_users_mask(plugin_dir):
    T, rho, k = 10, 0.6, 4
    model, batch = tiny(T)
    mask = np.array([[rho ** (t - s) if (t // k) * k <= s <= t else 0.0 for s in range(T)] for t in range(T)])
    est = method_gradient(model, batch, f"user-decay:rho={rho},k={k}", "cross_entropy")
    ref = masked_reference(model, batch, mask, "cross_entropy")
    for name in ref:
        torch.testing.assert_close(est[name], ref[name], rtol=1e-10, atol=1e-10)


def test_updates_method_from_plugin_trains_and_logs_its_schedule(plugin_dir):
    cfg = TrainConfig(task="copy-stream", method="user-doubling:k=2,every=3", steps=9, seq_len=30, batch_size=2,
                      hidden_size=4, eval_every=9, eval_batches=1,
                      task_params={"lag": 3, "length": 120, "valid_length": 40})
    result = train(cfg)
    assert result.k_used == [2 << (n // 3) for n in range(9)]
    assert np.isfinite(result.final["eval_loss"])


def test_plugin_method_through_the_cli(plugin_dir, capsys):
    assert main(["--plugins", str(plugin_dir), "explain", "user-decay:rho=0.5,k=3", "--seq-len", "6", "--picture"]) == 0
    out = capsys.readouterr().out
    assert "user-decay:rho=0.5,k=3" in out and "~" in out
    assert main(["--plugins", str(plugin_dir), "explain", "user-decay:rho=1.5,k=3", "--seq-len", "6"]) == 2


@pytest.mark.parametrize("spec", ["tbptt:k1=4,k2=2", "tbptt:k1=3,k2=7", "sliding:k=3,k1=2", "artbp:c=0.4,min=2",
                                  "hybrid:k1=2,every=3,long=5", "full", "chunked:k=1"])
def test_masks_of_built_in_methods_round_trip(spec):
    T = 13
    updates = parse_method(spec).updates(T, rng=np.random.default_rng(4))
    m = mask_matrix(updates, T)
    fitted = updates_from_mask(m, [u.loss_end for u in updates])
    assert np.array_equal(mask_matrix(fitted, T), m)


def test_masks_the_engine_cannot_run_are_rejected_with_the_loss_named():
    T = 5
    holes = np.tril(np.ones((T, T)))
    holes[4, 2] = 0.0  # loss 4 receives steps 0, 1, 3, 4: not one range
    with pytest.raises(UsageError, match="loss 4: the steps it receives must form one range"):
        updates_from_mask(holes, [T])
    own = np.tril(np.ones((T, T)))
    own[3, 3] = 0.5
    with pytest.raises(UsageError, match="loss 3: the weight of its own step"):
        updates_from_mask(own, [T])
    clash = np.tril(np.ones((T, T)))
    clash[4, :4] = 2.0  # factor 2 at position 4, which only loss 4 crosses: representable
    assert np.array_equal(mask_matrix(updates_from_mask(clash, [T]), T), clash)
    clash[3, :3] = 3.0  # factor 3 at position 3 for loss 3, but loss 4 gets no factor 3 there: not
    with pytest.raises(UsageError, match="not a product of per-position factors"):
        updates_from_mask(clash, [T])
    with pytest.raises(UsageError, match="update ends"):
        updates_from_mask(np.tril(np.ones((T, T))), [3, 2, T])


def test_updates_that_do_not_cover_every_loss_once_are_rejected():
    @define_method("user-gappy", summary="skips loss 2", replace=True)
    def gappy(length, first_update, rng):
        return [Update(0, 2, 0), Update(3, length, 3)]

    with pytest.raises(UsageError, match="update 1 covers losses"):
        parse_method("user-gappy").updates(6)
