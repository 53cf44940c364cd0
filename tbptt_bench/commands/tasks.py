"""``tbptt-bench tasks``: list the registered tasks, models and method families."""

from __future__ import annotations

import argparse

from tbptt_bench.commands.common import emit_json
from tbptt_bench.methods.base import METHODS
from tbptt_bench.models import MODELS
from tbptt_bench.tasks import TASKS


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tasks", help="list tasks, models and methods")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    tasks = {n: TASKS.get(n) for n in TASKS.names()}
    models = {n: MODELS.get(n) for n in MODELS.names()}
    methods = {n: METHODS.get(n) for n in METHODS.names()}
    if args.json:
        emit_json({
            "tasks": {n: {"description": c.description, "metric": c.metric_name, "loss": c.loss_kind,
                          "streaming": c.streaming, "tiny": c.tiny} for n, c in tasks.items()},
            "models": {n: (f.__doc__ or "").strip() for n, f in models.items()},
            "methods": {n: {"summary": c.summary, "parameters": list(c.schema)} for n, c in methods.items()},
        })
        return 0
    print("Tasks:")
    for n, c in tasks.items():
        print(f"  {n:<12} {c.description}  [metric: {c.metric_name}, loss: {c.loss_kind}]")
    print("Models:")
    for n, f in models.items():
        print(f"  {n:<12} {(f.__doc__ or '').strip()}")
    print("Methods:")
    for n, c in methods.items():
        params = ",".join(f"{k}=…" for k in c.schema)
        print(f"  {n + (':' + params if params else ''):<24} {c.summary}")
    return 0
