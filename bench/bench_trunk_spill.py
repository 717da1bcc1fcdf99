"""The first trunk pass in memory against through a file (the feature cache's ``spill``):
peak anonymous memory and wall time, same process, same trunk and data.

The trunk outputs token tensors, as a cut inside a ViT's encoder does: ``--tokens`` ×
``--hidden`` float32 values per sample (defaults 65 × 192: the small ViT of the tests at
64×64 pixels, patch 8; ViT-B/16 is 197 × 768, 0.58 MB per sample, 1.15 MiB with the
residual stream the cut also carries). Three runs, interleaved ``--repeats`` times:

* ``memory``: ``FeatureCache.get_or_compute`` as before (features preallocated in memory,
  then written to the cache);
* ``spill``: ``get_or_compute(..., spill=True)`` (features written to a file in the cache
  folder as they are computed, the entry written from it and returned memory-mapped);
* ``hit``: reading that entry back (memory-mapped), for scale.

Peak anonymous memory is ``RssAnon`` of ``/proc/self/status`` sampled every 5 ms by a
thread, above the process's level before the run (file-backed pages, which the OS can
write out and drop, are not counted: that is the point). Each run starts from an empty
cache folder. Prints each run's median and the ratios spill / memory.

Usage::

    python bench/bench_trunk_spill.py --samples 4000
"""

from __future__ import annotations

import argparse
import gc
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fairdeploy.cache import FeatureCache
from fairdeploy.features import compute_features


class _Dataset(torch.utils.data.Dataset):
    def __init__(self, n: int, d: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, d, generator=g)
        self.targets = np.zeros(n, dtype=np.int64)
        self.groups = np.arange(n) % 2

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.x[i], int(self.targets[i]), int(self.groups[i])


def _rss_anon() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class _Peak:
    """Peak RssAnon above the level at start, sampled by a thread."""

    def __enter__(self) -> _Peak:
        gc.collect()
        self.base = self.peak = _rss_anon()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_anon())
            time.sleep(0.005)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_anon())

    @property
    def above(self) -> int:
        return self.peak - self.base


def _run(kind: str, trunk: nn.Module, data: _Dataset, folder: Path) -> tuple[float, int]:
    cache = FeatureCache(folder)

    def compute(spill: Path | None = None):
        return compute_features(trunk, data, batch_size=64, progress=False, spill=spill)

    with _Peak() as peak:
        t0 = time.perf_counter()
        fs, hit = cache.get_or_compute({"bench": 1}, compute, spill=kind != "memory")
        float(fs.features[-1].sum())  # touch the result
        wall = time.perf_counter() - t0
    assert hit == (kind == "hit")
    del fs
    return wall, peak.above


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=4000)
    ap.add_argument("--tokens", type=int, default=65)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(2)
    torch.manual_seed(0)
    t, h = args.tokens, args.hidden
    trunk = nn.Sequential(nn.Linear(16, t * h), nn.Unflatten(1, (t, h)), nn.GELU()).eval()
    data = _Dataset(args.samples, 16)
    size = args.samples * t * h * 4
    print(f"{args.samples} samples × {t} × {h} float32 = {size / 2**20:.0f} MiB of features; "
          f"{torch.get_num_threads()} threads, {args.repeats} interleaved repeats")
    results: dict[str, list[tuple[float, int]]] = {"memory": [], "spill": [], "hit": []}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for kind in ("memory", "spill"):
                folder = Path(tmp) / kind
                shutil.rmtree(folder, ignore_errors=True)
                results[kind].append(_run(kind, trunk, data, folder))
            results["hit"].append(_run("hit", trunk, data, Path(tmp) / "spill"))
    med = {k: (statistics.median(w for w, _ in v), statistics.median(m for _, m in v))
           for k, v in results.items()}
    for kind, (wall, mem) in med.items():
        print(f"{kind:>6}: {wall:6.2f} s, peak anonymous memory +{mem / 2**20:7.1f} MiB "
              f"({mem / size:.2f}× the features)")
    (wm, mm), (ws, ms) = med["memory"], med["spill"]
    print(f"spill / memory: time ×{ws / wm:.2f}, peak anonymous memory ×{ms / max(mm, 1):.3f}")


if __name__ == "__main__":
    main()
