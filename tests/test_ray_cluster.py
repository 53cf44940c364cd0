"""A real two-node Ray cluster, started the documented way (`ray start --head`, `ray start --address`),
with token authentication on, runs a suite through ``--ray-address`` and gives the local executor's table.

The cluster lives in private network and process namespaces (``unshare``): its only interface is
loopback, so no traffic goes anywhere else, and ``ray stop`` there sees only this test's processes.
``HOME`` is a temporary folder, so the token is this test's own, never the user's ``~/.ray/auth_token``.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pandas as pd
import pytest

from tbptt_bench.cli import main
from tbptt_bench.suites.store import read_results

pytest.importorskip("ray")
REPO = Path(__file__).resolve().parent.parent
UNSHARE = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--map-root-user"]

SUITE = """
[suite]
name = "raycluster"
seed = 5

[defaults]
seq_len = 8
batch_size = 2
hidden_size = 4

[[train]]
task = "adding"
model = ["rnn", "lstm"]
method = ["full", "tbptt:k1=2,k2=4"]
steps = 4
eval_every = 2
eval_batches = 1
"""

SCRIPT = """
set -u
ip link set lo up
echo "INTERFACES $(ip -o addr | awk '{print $2}' | sort -u | tr '\\n' ' ')"
trap 'ray stop --force >/dev/null 2>&1' EXIT
ray get-auth-token --generate >/dev/null 2>&1
START="--node-ip-address 127.0.0.1 --num-cpus 1 --disable-usage-stats --temp-dir $TMPRAY"
ray start --head --port 6390 --include-dashboard false $START >$OUT/head.log 2>&1 || { tail -5 $OUT/head.log; echo HEAD FAILED; exit 3; }
RAY_AUTH_MODE=token ray start --address 127.0.0.1:6390 $START >$OUT/worker.log 2>&1 || { tail -5 $OUT/worker.log; echo WORKER FAILED; exit 3; }
echo "NODES $(RAY_AUTH_MODE=token python -c 'import ray; ray.init(address="127.0.0.1:6390", logging_level="ERROR", log_to_driver=False); print(sum(n["Alive"] for n in ray.nodes()))' 2>/dev/null)"
HOME=$NOTOKEN python -m tbptt_bench.cli run $SUITE --results $OUT/denied --executor ray --ray-address 127.0.0.1:6390 --quiet 2>$OUT/denied.err
echo "DENIED $?"
python -m tbptt_bench.cli run $SUITE --results $OUT/ray --executor ray --ray-address 127.0.0.1:6390 --quiet
echo "RAN $?"
"""

PARAMS = ["task", "model", "method", "seed", "replicate", "steps", "seq_len", "batch_size", "hidden_size"]
METRICS = ["status", "train_loss", "eval_loss", "eval_metric", "update", "tokens", "baseline"]


def _namespaces_available() -> str | None:
    if shutil.which("unshare") is None or shutil.which("ray") is None or shutil.which("ip") is None:
        return "needs unshare, ip and the ray command"
    probe = subprocess.run([*UNSHARE, "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare into private network and process namespaces is not permitted here: {probe.stderr.decode()[:200]}"
    return None


@pytest.mark.slow
def test_two_node_cluster_with_token_auth_matches_local_executor(tmp_path: Path,
                                                                 request: pytest.FixtureRequest) -> None:
    reason = _namespaces_available()
    if reason:
        pytest.skip(reason)
    suite = tmp_path / "raycluster.toml"
    suite.write_text(textwrap.dedent(SUITE))
    for name in ("home", "notoken", "out"):
        (tmp_path / name).mkdir()
    short = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # Ray's socket paths must stay under 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(short, ignore_errors=True))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(tmp_path / "home"), NOTOKEN=str(tmp_path / "notoken"), TMPRAY=str(short),
               OUT=str(tmp_path / "out"), SUITE=str(suite), PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}")
    proc = subprocess.run([*UNSHARE, "sh", "-c", SCRIPT], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    lines = dict(line.split(" ", 1) for line in proc.stdout.splitlines() if line.split(" ", 1)[0].isupper()
                 and " " in line)
    assert lines.get("INTERFACES", "").split() == ["lo"], proc.stdout  # loopback only
    assert lines.get("NODES") == "2", (proc.stdout, proc.stderr[-2000:])

    # Ray's core logs its retries on stderr before giving up (not ours to silence); our error is one last line.
    denied = (tmp_path / "out" / "denied.err").read_text().splitlines()
    ours = [line for line in denied if line.startswith("tbptt-bench")]
    assert lines.get("DENIED") == "2" and ours == denied[-1:], denied[-3:]
    assert "RAY_AUTH_TOKEN" in ours[0] and "auth_token" in ours[0] and "Traceback" not in "".join(denied), ours
    assert lines.get("RAN") == "0", (proc.stdout, proc.stderr[-2000:])

    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        assert main(["run", str(suite), "--results", str(tmp_path / "local"), "--quiet"]) == 0
    local = read_results(tmp_path / "local" / "raycluster").sort_values("key").reset_index(drop=True)
    remote = read_results(tmp_path / "out" / "ray" / "raycluster").sort_values("key").reset_index(drop=True)
    assert list(local["key"]) == list(remote["key"]) and len(local) == 4
    assert set(remote["executor"]) == {"ray"} and set(local["executor"]) == {"local"}
    pd.testing.assert_frame_equal(local[PARAMS + METRICS], remote[PARAMS + METRICS])
    columns = ["key", "update", "train_loss", "eval_loss", "eval_metric"]
    curves = [read_results(root, "curves")[columns].sort_values(columns[:2]).reset_index(drop=True)
              for root in (tmp_path / "local" / "raycluster", tmp_path / "out" / "ray" / "raycluster")]
    pd.testing.assert_frame_equal(*curves)
