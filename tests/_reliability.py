"""Helpers for the reliability tests: a tiny project, the CLI's error contract, snapshots.

The contract every command must keep, whatever its input (issue 11):

- exit code 0 and a valid result, or
- exit code 1 with exactly one ``Error: ...`` line and no traceback (``verify`` may
  instead end with its ``FAILED`` line: a comparison that fails is its answer);
- no temporary file left anywhere, and nothing outside the run folder (and the
  cache, which only gains complete entries) changed.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from fairdeploy._stale import is_owned_temporary
from fairdeploy.cli import main

ROOT = Path(__file__).resolve().parents[1]

#: Examples per property test: ``HYPOTHESIS_PROFILE=thorough`` runs the large profile.
THOROUGH = os.environ.get("HYPOTHESIS_PROFILE") == "thorough"
#: Random (not derandomized) examples: the thorough profile, or an explicit example count.
RANDOM = THOROUGH or bool(os.environ.get("HYPOTHESIS_EXAMPLES"))


def examples(ci: int, thorough: int) -> int:
    """``ci`` examples normally, ``thorough`` under ``HYPOTHESIS_PROFILE=thorough``;
    ``HYPOTHESIS_EXAMPLES=N`` sets every property test to N (for quick explorations)."""
    if os.environ.get("HYPOTHESIS_EXAMPLES"):
        return int(os.environ["HYPOTHESIS_EXAMPLES"])
    return thorough if THOROUGH else ci


TINY_RECIPE = """\
name: tiny
model:
  arch: mlp
  num_classes: 3
  kwargs: {{in_features: {d}, widths: [16, 16]}}
data:
  kind: npz
  path: {data}
  split: {{mode: column}}
sensitive:
  attribute: group
  groups: {{a: [0], b: [1]}}
  privileged: auto
method:
  name: fairlrf
  beta: 5/9
  layers:
    - {{layer: layers.2, rank: 4, sr: 0.25, rr: 0.5}}
  scoring: {{samples_per_group: 48, batch_size: 32}}
train: {{epochs: 2, lr: 0.05, step_epochs: 1, batch_size: 32, augment: false}}
export: {{verify_samples: 40, simplify: false}}
report: {{latency_batches: [1], latency_warmup: 0, latency_iterations: 1}}
"""


def make_data(path: Path, n: int = 240, d: int = 6, seed: int = 0) -> dict[str, np.ndarray]:
    """Three learnable classes, two groups (group 1 noisier), a split column."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 2, n)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=(d, 3))
    y = (x @ w + rng.normal(scale=0.3 + 0.9 * group[:, None], size=(n, 3))).argmax(1)
    split = np.array(["train"] * (n // 2) + ["val"] * (n // 4) + ["test"] * (n - n // 2 - n // 4))
    arrays = {"x": x, "y": y.astype(np.int64), "group": group.astype(np.int64), "split": split}
    np.savez(path, **arrays)
    return arrays


@dataclass(frozen=True)
class Tiny:
    """A trained tiny project in ``root``: data.npz, recipe.yaml, ckpt.pt."""

    root: Path

    @property
    def data(self) -> Path:
        return self.root / "data.npz"

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def ckpt(self) -> Path:
        return self.root / "ckpt.pt"

    def copy_to(self, dest: Path) -> Tiny:
        """The same project in ``dest`` (its recipe names data.npz relative to itself)."""
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("data.npz", "recipe.yaml", "ckpt.pt"):
            shutil.copy2(self.root / name, dest / name)
        return Tiny(dest)


def make_tiny(root: Path, *, d: int = 6) -> Tiny:
    """Write data and recipe into ``root`` and train the checkpoint (about a second)."""
    root.mkdir(parents=True, exist_ok=True)
    make_data(root / "data.npz", d=d)
    (root / "recipe.yaml").write_text(TINY_RECIPE.format(d=d, data="data.npz"))
    out = invoke("train", "--recipe", str(root / "recipe.yaml"), "-o", str(root / "ckpt.pt"))
    assert out.code == 0, out.text
    (root / "ckpt.pt.train").unlink()  # the resume state: not part of the project
    return Tiny(root)


@dataclass(frozen=True)
class Outcome:
    """What a CLI call did."""

    code: int
    text: str
    exception: BaseException | None

    @property
    def lines(self) -> list[str]:
        return self.text.strip().splitlines()


def invoke(*args: str, cwd: Path | None = None) -> Outcome:
    """Run the CLI in this process (click's CliRunner), output and errors together."""
    old = os.getcwd()
    try:
        if cwd is not None:
            os.chdir(cwd)
        result = CliRunner().invoke(main, [str(a) for a in args])
    finally:
        os.chdir(old)
    exc = result.exception
    if isinstance(exc, SystemExit):
        exc = None
    return Outcome(result.exit_code, result.output, exc)


def run_subprocess(*args: str, cwd: Path | None = None, timeout: float = 300) -> Outcome:
    """Run ``python -m fairdeploy.cli`` in a fresh process (this checkout first on the path)."""
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(
        [sys.executable, "-m", "fairdeploy.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )
    return Outcome(proc.returncode, proc.stdout + proc.stderr, None)


def check_contract(out: Outcome, *, verify: bool = False) -> str:
    """Assert the CLI contract; return ``"ok"``, ``"error"`` or ``"failed"`` (verify only)."""
    assert out.exception is None, (
        f"an exception escaped: {type(out.exception).__name__}: {out.exception}\n{out.text}"
    )
    assert "Traceback" not in out.text, out.text
    errors = [ln for ln in out.lines if ln.startswith("Error:")]
    if out.code == 0:
        assert not errors, out.text
        return "ok"
    if verify and out.code == 1 and not errors and out.lines and out.lines[-1].startswith(
        "FAILED"
    ):
        return "failed"
    assert out.code == 1, f"exit code {out.code}:\n{out.text}"
    assert len(errors) == 1, out.text
    assert out.lines[-1].startswith("Error: "), out.text
    assert "Aborted" not in out.text, out.text
    return "error"


def snapshot(root: Path, *, skip: tuple[Path, ...] = ()) -> dict[str, tuple[int, str]]:
    """Every file under ``root`` (except under ``skip``): relative path → (size, sha256)."""
    out = {}
    skip_s = tuple(str(s) for s in skip)
    for dirpath, dirnames, filenames in os.walk(root):
        if dirpath.startswith(skip_s):
            dirnames[:] = []
            continue
        for name in filenames:
            p = Path(dirpath) / name
            if str(p).startswith(skip_s):
                continue
            data = p.read_bytes()
            out[str(p.relative_to(root))] = (len(data), hashlib.sha256(data).hexdigest())
        for name in list(dirnames):
            if str(Path(dirpath) / name).startswith(skip_s):
                dirnames.remove(name)
    return out


def temporaries(root: Path) -> list[Path]:
    """Every owned temporary (file or folder) under ``root``, and any ``*.tmp`` file."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            if is_owned_temporary(name) or name.endswith(".tmp"):
                found.append(Path(dirpath) / name)
    return found


def check_run_folder(folder: Path) -> dict:
    """A complete run folder: its manifest lists exactly its files, with their SHA-256."""
    manifest = json.loads((folder / "manifest.json").read_text())
    names = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    names -= {"manifest.json"}
    assert names == set(manifest["files"]), (names, manifest["files"].keys())
    folders = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_dir()}
    assert folders == set(manifest.get("folders", [])), folders
    for name, rec in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert rec["bytes"] == len(data) and rec["sha256"] == hashlib.sha256(data).hexdigest()
    report = json.loads((folder / "report.json").read_text())
    assert report["schema_version"] == 1
    return report


def without_blocking(
    fifos: list[Path], call: Callable[[], object], *, timeout: float = 30.0
) -> BaseException | object:
    """Run ``call`` in a thread and return what it returned or raised; fail the test (after
    unblocking it by opening each of ``fifos`` for writing) if it is still running after
    ``timeout`` seconds: it opened a FIFO for reading and waits on it."""
    import contextlib
    import threading

    import pytest

    outcome: list[object] = []

    def run() -> None:
        try:
            outcome.append(call())
        except BaseException as exc:  # handed to the test's thread
            outcome.append(exc)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        for fifo in fifos:
            with contextlib.suppress(OSError):
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(5)
        pytest.fail("a special file was opened for reading and blocked")
    return outcome[0]
