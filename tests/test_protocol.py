"""A user-defined model that follows only the public protocol works with every method."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tbptt_bench.errors import UsageError
from tbptt_bench.analysis.gradients import method_gradient
from tbptt_bench.core.mask import mask_matrix
from tbptt_bench.methods.base import parse_method
from tbptt_bench.models.protocol import check_state
from tbptt_bench.tasks.base import Batch

from reference import masked_reference


class LeakyTwoState(nn.Module):
    """A user cell with a tuple state and no read-out split: every parameter is recurrent."""

    def __init__(self, c: int = 2, h: int = 3) -> None:
        super().__init__()
        self.h = h
        self.w_in = nn.Parameter(torch.randn(c, h, dtype=torch.float64) * 0.5)
        self.w_rec = nn.Parameter(torch.randn(h, h, dtype=torch.float64) * 0.9)
        self.w_out = nn.Parameter(torch.randn(h, 1, dtype=torch.float64) * 0.5)
        self.leak = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))

    def initial_state(self, batch_size: int):
        z = torch.zeros(1, batch_size, self.h, dtype=torch.float64)
        return (z, z.clone())

    def forward(self, inputs, state):
        h, m = state[0][0], state[1][0]
        outs = []
        for t in range(inputs.shape[1]):
            h = torch.tanh(inputs[:, t] @ self.w_in + h @ self.w_rec)
            m = self.leak * m + (1 - self.leak) * h
            outs.append(m @ self.w_out)
        return torch.stack(outs, 1), (h[None], m[None])


@pytest.mark.parametrize("spec", ["full", "full:checkpoint=3", "chunked:k=3", "tbptt:k1=2,k2=5", "tbptt:k1=4,k2=2", "sliding:k=3"])
def test_user_model_every_method_matches_reference(spec):
    torch.manual_seed(1)
    model = LeakyTwoState()
    g = torch.Generator().manual_seed(3)
    batch = Batch(torch.rand(2, 8, 2, generator=g, dtype=torch.float64),
                  torch.rand(2, 8, 1, generator=g, dtype=torch.float64), torch.ones(2, 8, dtype=torch.float64))
    method = parse_method(spec)
    est = method_gradient(model, batch, method, "mse")
    ref = masked_reference(model, batch, mask_matrix(method.updates(8), 8), "mse")
    for k in ref:
        torch.testing.assert_close(est[k], ref[k], rtol=1e-10, atol=1e-12)


def test_bad_state_is_a_usage_error():
    with pytest.raises(UsageError, match="batch in dimension 1"):
        check_state([torch.zeros(1, 2, 3)])
    with pytest.raises(UsageError):
        check_state(torch.zeros(3))
