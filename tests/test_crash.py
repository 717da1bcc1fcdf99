"""Crash safety: ``optimize`` and ``train`` killed at random points, in real subprocesses.

After each kill (SIGKILL, which cannot be caught, or SIGTERM, which cleans up):

- there is no partial run folder (absent, or complete with its manifest);
- the next run succeeds and its numbers are identical to an uninterrupted run's
  (``optimize``: the report's methods, intervals and verification; ``train``: the
  weights and the history, through the resume state);
- no temporary file is left anywhere after it.

The child imports everything before it says "ready", so the kill points spread over the
work, not over Python's start-up. ``CRASH_TRIALS=N`` runs N kills per command (default:
3 for optimize, 2 for train).
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from _reliability import (
    ROOT,
    Tiny,
    check_contract,
    check_run_folder,
    invoke,
    make_tiny,
    temporaries,
)

_CHILD = """
import sys
from fairdeploy.cli import main
import fairdeploy.commands.compare, fairdeploy.commands.optimize  # noqa: E401
import fairdeploy.commands.sweep, fairdeploy.commands.train  # noqa: E401
import fairdeploy.export, fairdeploy.train, onnx, onnxruntime  # noqa: E401
print("ready", flush=True)
main(sys.argv[1:])
"""

TRIALS = int(os.environ.get("CRASH_TRIALS", "0"))


def _kill_at(args: list[str], cwd: Path, delay: float, sig: int) -> int:
    """Start the CLI in a subprocess, send ``sig`` ``delay`` seconds into its work."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert proc.stdout.readline().strip() == b"ready"
        time.sleep(delay)
        proc.send_signal(sig)
        return proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()


def _numbers(report: dict) -> dict:
    v = report["verify"]
    return {
        "methods": report["methods"],
        "bootstrap": report["bootstrap"],
        "verify": (v["passed"], v["max_abs_error"], v["argmax_agreement"], v["samples"]),
        "onnx": report["onnx"],
    }


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("crash")
    tiny = make_tiny(root / "tiny")
    t0 = time.perf_counter()
    out = invoke("optimize", tiny.ckpt, "--recipe", tiny.recipe, "--out", root / "ref",
                 "--exports", root / "ref-exp", "--no-latency")
    seconds = time.perf_counter() - t0
    assert check_contract(out) == "ok", out.text
    return {"tiny": tiny, "report": check_run_folder(root / "ref"), "seconds": seconds}


def _plan(n_default: int, seed: int) -> list[tuple[float, int]]:
    """Kill points: fractions of an uninterrupted run, and the signal (SIGTERM last)."""
    rng = random.Random(seed)
    n = TRIALS or n_default
    return [(rng.uniform(0.0, 1.1), signal.SIGTERM if i == n - 1 else signal.SIGKILL)
            for i in range(n)]


def test_optimize_killed_at_random_points(project: dict, tmp_path: Path) -> None:
    tiny: Tiny = project["tiny"].copy_to(tmp_path / "p")
    args = ["optimize", str(tiny.ckpt), "--recipe", str(tiny.recipe), "--out",
            str(tmp_path / "run"), "--exports", str(tmp_path / "exp"), "--no-latency"]
    for fraction, sig in _plan(3, seed=11):
        status = _kill_at(args, tmp_path, fraction * project["seconds"], sig)
        assert status in (0, -sig), status  # finished before the signal, or killed by it
        run = tmp_path / "run"
        if run.exists():
            check_run_folder(run)  # never partial: absent, or complete
        if sig == signal.SIGTERM:
            assert not temporaries(tmp_path), temporaries(tmp_path)  # cleaned up at once
        out = invoke(*args)
        assert check_contract(out) == "ok", out.text
        assert _numbers(check_run_folder(run)) == _numbers(project["report"])
        assert not temporaries(tmp_path), temporaries(tmp_path)


def test_train_killed_at_random_points_resumes_to_the_same_weights(
    project: dict, tmp_path: Path
) -> None:
    tiny: Tiny = project["tiny"].copy_to(tmp_path / "p")
    ref = tmp_path / "ref.pt"
    args = ["train", "--recipe", str(tiny.recipe), "--epochs", "12"]
    t0 = time.perf_counter()
    assert check_contract(invoke(*args, "-o", ref)) == "ok"
    seconds = time.perf_counter() - t0
    expected = torch.load(ref, weights_only=True)
    ckpt = tmp_path / "c.pt"
    for fraction, sig in _plan(2, seed=5):
        status = _kill_at([*args, "-o", str(ckpt)], tmp_path, fraction * seconds, sig)
        assert status in (0, -sig), status
        if ckpt.exists():
            torch.load(ckpt, weights_only=True)  # never half-written
        if sig == signal.SIGTERM:
            assert not temporaries(tmp_path), temporaries(tmp_path)
        out = invoke(*args, "-o", ckpt)  # resumes from the last complete epoch
        assert check_contract(out) == "ok", out.text
        got = torch.load(ckpt, weights_only=True)
        assert got["state_dict"].keys() == expected["state_dict"].keys()
        assert all(torch.equal(got["state_dict"][k], expected["state_dict"][k])
                   for k in expected["state_dict"])
        assert got["metadata"]["history"] == expected["metadata"]["history"]
        assert not temporaries(tmp_path), temporaries(tmp_path)
        ckpt.unlink()
        ckpt.with_name(ckpt.name + ".train").unlink()
