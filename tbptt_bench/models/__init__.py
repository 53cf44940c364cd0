"""Models: the protocol and registry (``protocol``) and the built-in recurrent models, registered on import."""

from tbptt_bench.models import recurrent  # noqa: F401  (registers rnn, lstm, gru)
from tbptt_bench.models import attention  # noqa: F401  (registers xl, sab, sab-cut)
from tbptt_bench.models import influence  # noqa: F401  (registers influence-linear)
from tbptt_bench.models.protocol import MODELS, State, register_model

__all__ = ["MODELS", "State", "register_model"]
