"""What the integrity checks cost: each one as a ratio to the work it guards, interleaved.

- checkpoint CRC check (``zipfile.testzip``) vs ``torch.load`` of the same checkpoint;
- a cache entry's content checksum (``tensors_checksum``) vs ``torch.save`` + ``torch.load``
  of the same tensors;
- the run folder's manifest (SHA-256 of every file) vs writing those files;
- the model/data probe (two samples) vs one trunk pass over the verification samples.

Each pair is timed alternately (A, B, A, B, ...) in one process, and the median ratio is
printed with the machine load (``os.getloadavg``). Sizes default to the paper's VGG-11
(a 515 MB checkpoint, FC-2 features of 2 × 1024 samples × 4096); ``--quick`` uses a tenth.

    python bench/bench_integrity.py [--quick] [--mb 515] [--repeat 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import zipfile
from pathlib import Path

import torch

from fairdeploy._probe import check_model_takes_inputs
from fairdeploy.cache import tensors_checksum
from fairdeploy.models import build_model
from fairdeploy.rundir import staging_dir


def _interleaved(a, b, repeat: int) -> tuple[float, float, float]:
    """Median seconds of ``a`` and ``b`` timed alternately, and the median ratio a/b."""
    a()
    b()  # warm-up
    ta, tb, ratios = [], [], []
    for _ in range(repeat):
        t = time.perf_counter()
        a()
        ta.append(time.perf_counter() - t)
        t = time.perf_counter()
        b()
        tb.append(time.perf_counter() - t)
        ratios.append(ta[-1] / tb[-1])
    return statistics.median(ta), statistics.median(tb), statistics.median(ratios)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a tenth of the default sizes")
    ap.add_argument("--mb", type=float, default=515.0, help="checkpoint size in MB")
    ap.add_argument("--samples", type=int, default=2048, help="cached feature rows")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    scale = 0.1 if args.quick else 1.0
    print(f"load average {os.getloadavg()}; torch threads {torch.get_num_threads()}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = int(args.mb * scale * 2**20 / 4)
        ckpt = tmp / "ckpt.pt"
        torch.save({"state_dict": {"w": torch.randn(n)}}, ckpt)

        def crc() -> None:
            with zipfile.ZipFile(ckpt) as zf:
                assert zf.testzip() is None

        a, b, r = _interleaved(crc, lambda: torch.load(ckpt, weights_only=True), args.repeat)
        print(f"checkpoint {ckpt.stat().st_size / 1e6:.0f} MB: CRC check {a:.3f} s, "
              f"torch.load {b:.3f} s, ratio {r:.2f}")

        rows = int(args.samples * scale)
        tensors = {"features": torch.randn(rows, 4096), "targets": torch.zeros(rows).long()}
        entry = tmp / "entry.pt"

        def save_load() -> None:
            torch.save(tensors, entry)
            torch.load(entry, weights_only=True)

        a, b, r = _interleaved(lambda: tensors_checksum("k", tensors), save_load, args.repeat)
        print(f"cache entry {rows}×4096: checksum {a:.3f} s, save+load {b:.3f} s, ratio {r:.2f}")

        files = {"model.onnx": os.urandom(int(args.mb * scale * 2**20 * 0.95)),
                 "model.pt": os.urandom(int(args.mb * scale * 2**20)),
                 "report.json": b"{}" * 1000}

        def write_plain() -> None:
            d = tmp / "plain"
            d.mkdir(exist_ok=True)
            for name, data in files.items():
                (d / name).write_bytes(data)

        def write_run() -> None:  # the same writes, plus the manifest and the rename
            with staging_dir(tmp / "run") as d:
                for name, data in files.items():
                    (d / name).write_bytes(data)

        a, b, r = _interleaved(write_run, write_plain, args.repeat)
        print(f"run folder ({sum(map(len, files.values())) / 1e6:.0f} MB): with manifest "
              f"{a:.3f} s, plain writes {b:.3f} s, ratio {r:.2f}")

        model = build_model("vgg11_paper", 2).eval()
        x = torch.randn(int(1024 * scale), 3, 112, 112)

        def probe() -> None:
            check_model_takes_inputs(model, x, what="bench")

        def trunk_pass() -> None:
            with torch.inference_mode():
                for i in range(0, len(x), 64):
                    model.features(x[i : i + 64])

        a, b, r = _interleaved(probe, trunk_pass, max(1, args.repeat // 2))
        print(f"probe of vgg11_paper on 2 samples {a:.3f} s vs a trunk pass over {len(x)} "
              f"samples {b:.3f} s, ratio {r:.3f}")
    print(f"load average {os.getloadavg()}")


if __name__ == "__main__":
    main()
