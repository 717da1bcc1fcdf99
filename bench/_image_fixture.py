"""What the pipeline benchmarks share: a fixture image_csv dataset of random JPEGs and
the FairLRF recipe on vgg11_paper's FC-2 they time (``bench_optimize.py``,
``bench_sweep.py``; ``bench_compare.py`` adds its compare rows to it), and the
power-law FC-2 weight they can give the model.

Imported by those scripts as a sibling module (run them as ``python bench/<name>.py``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["FAIRLRF_FC2_RECIPE", "image_csv_fixture", "power_law_fc2"]

#: FairLRF on classifier.3 (k=64, sr 0.4, rr 0, β 5/9) over the fixture; fill in
#: ``csv``, ``per_group`` (scoring samples per group) and ``verify`` (verify_samples).
FAIRLRF_FC2_RECIPE = """\
name: bench
model: {{arch: vgg11_paper, num_classes: 4}}
data:
  kind: image_csv
  csv: {csv}
  split: {{mode: column}}
  check_images: none
sensitive: {{attribute: group, groups: {{a: [0], b: [1]}}, privileged: auto}}
method:
  name: fairlrf
  beta: 5/9
  layers: [{{layer: classifier.3, rank: 64, sr: 0.4, rr: 0.0}}]
  scoring: {{samples_per_group: {per_group}, batch_size: 64}}
export: {{simplify: false, verify_samples: {verify}}}
"""


def image_csv_fixture(root: Path, n: int, classes: int = 4) -> Path:
    """``n`` random 128×128 JPEGs under ``root/imgs`` and ``root/labels.csv`` (path, label,
    group, split: the first half train, then a quarter val, a quarter test; label
    ``i % classes``, group ``(i // classes) % 2``), seeded; returns the CSV's path."""
    rng = np.random.default_rng(0)
    (root / "imgs").mkdir(parents=True)
    rows = ["path,label,group,split"]
    for i in range(n):
        arr = rng.integers(0, 256, size=(128, 128, 3), dtype=np.uint8)
        Image.fromarray(arr).save(root / "imgs" / f"{i}.jpg", quality=90)
        split = "train" if i < n // 2 else ("val" if i < 3 * n // 4 else "test")
        rows.append(f"imgs/{i}.jpg,{i % classes},{(i // classes) % 2},{split}")
    (root / "labels.csv").write_text("\n".join(rows) + "\n")
    return root / "labels.csv"


def power_law_fc2(state: dict[str, torch.Tensor]) -> None:
    """Give vgg11_paper's FC-2 weight (``classifier.3.weight``, 4096×4096) a trained-like
    power-law spectrum σ_i ∝ i^-0.5 with the same Frobenius norm, in place (random
    orthogonal singular vectors from torch's global generator: seed it first)."""
    w = state["classifier.3.weight"].double()
    q1, _ = torch.linalg.qr(torch.randn(4096, 4096, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(4096, 4096, dtype=torch.float64))
    sigma = torch.arange(1, 4097, dtype=torch.float64) ** -0.5
    sigma *= w.norm() / sigma.norm()
    state["classifier.3.weight"] = ((q1 * sigma) @ q2.T).float()
