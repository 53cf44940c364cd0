"""``tbptt-bench grad``: a method's gradient estimate against the true gradient on one batch."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from tbptt_bench import __version__
from tbptt_bench.atomic import atomic_path, check_parent
from tbptt_bench.commands.common import build, check_output, check_sizes, emit_json, run_options
from tbptt_bench.analysis.gradients import compare, method_gradient, true_gradient
from tbptt_bench.methods.base import parse_method
from tbptt_bench.methods.length import warn_long_windows
from tbptt_bench.options import add_arguments, from_args
from tbptt_bench.seeding import derive_seed, generator

#: The run fields ``grad`` takes (one batch, so smaller defaults than training's).
OPTIONS = run_options(seq_len=40, batch_size=4, hidden_size=16)
LOSS_NORMALISATION = "L = sum over steps t of l_t; l_t = (1/B) * sum over rows b of w[b,t] * loss(b,t)"


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("grad", help="gradient estimate of a method vs the true gradient on one batch")
    add_arguments(p, OPTIONS)
    p.add_argument("--method", required=True, help="method spec, e.g. tbptt:k1=5,k2=10")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.add_argument("--save", metavar="FILE.npz", help="write parameters, data and both gradients")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    method = parse_method(args.method)
    v = from_args(args, OPTIONS)
    check_sizes(v)
    check_output(args.save, "--save")
    warn_long_windows([method], v["seq_len"])
    task, model = build(v)
    batch = task.sample(v["batch_size"], v["seq_len"], generator(derive_seed("data", v["seed"])))
    data = batch.to(v["device"], next(model.parameters()).dtype)
    state = model.initial_state(v["batch_size"])
    est = method_gradient(model, data, method, task.loss_kind, state, seed=v["seed"])
    true = true_gradient(model, data, task.loss_kind, state)
    metrics = {group: c.as_dict() for group, c in compare(est, true).items()}
    meta = {
        "task": v["task"], "model": v["model"], "method": method.spec, "seq_len": v["seq_len"],
        "batch": v["batch_size"], "hidden": v["hidden_size"], "layers": v["num_layers"], "seed": v["seed"],
        "dtype": v["dtype"], "loss_kind": task.loss_kind, "loss_normalisation": LOSS_NORMALISATION,
        "tbptt_bench": __version__, "torch": torch.__version__, "numpy": np.__version__,
    }
    if args.save:
        save_npz(Path(args.save), model, state, data, est, true, meta)
    if args.json:
        emit_json({**meta, "metrics": metrics})
    else:
        print(f"{method.spec} on {v['task']}/{v['model']}, T={v['seq_len']}, B={v['batch_size']}:")
        for group, m in metrics.items():
            print(f"  {group:<10} relative error {m['relative_error']:.6g}  cosine {m['cosine']:.6g}  "
                  f"norm ratio {m['norm_ratio']:.6g}")
    return 0


def save_npz(path: Path, model, state, data, est, true, meta) -> None:  # type: ignore[no-untyped-def]
    """Write the .npz atomically (nothing is left behind if anything fails)."""
    check_parent(path)
    arrays: dict[str, np.ndarray] = {}
    for name, value in model.state_dict().items():
        arrays[f"param/{name}"] = value.detach().cpu().numpy()
    parts = state if isinstance(state, tuple) else (state,)
    for i, s in enumerate(parts):
        arrays[f"initial_state/{i}"] = s.detach().cpu().numpy()
    arrays["inputs"] = data.inputs.cpu().numpy()
    arrays["targets"] = data.targets.cpu().numpy()
    arrays["weights"] = data.weights.cpu().numpy()
    for name, g in est.items():
        arrays[f"grad_estimate/{name}"] = g.cpu().numpy()
    for name, g in true.items():
        arrays[f"grad_true/{name}"] = g.cpu().numpy()
    arrays["metadata"] = np.array(json.dumps(meta))
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez(fh, **arrays)
