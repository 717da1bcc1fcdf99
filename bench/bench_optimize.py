"""Wall time of `optimize` on vgg11_paper against one trunk pass over the same images.

    python bench/bench_optimize.py [--images 240] [--threads 2]

Builds a fixture image_csv dataset (random JPEGs) and a random-init vgg11_paper checkpoint
in a temporary folder, then times, in this process:

1. the baseline: one forward pass of the frozen trunk (everything before FC-2) over the
   images `optimize` reads (the scoring sets, validation and test);
2. `optimize` (FairLRF on classifier.3, k=64, sr=0.4, rr=0; export, verify, report; no
   latency measurement) with an empty feature cache;
3. the same run again, features read from the persisted cache.

Targets (issue 4): run 1 ≤ 1.3 × the trunk pass; run 2 ≤ 0.2 × run 1.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _image_fixture import FAIRLRF_FC2_RECIPE, image_csv_fixture, power_law_fc2

from fairdeploy.commands.optimize import run_optimize
from fairdeploy.data import load_splits
from fairdeploy.features import compute_features, split_model
from fairdeploy.models import build_model
from fairdeploy.recipe import load_recipe
from fairdeploy.scoring import scoring_indices

RECIPE = FAIRLRF_FC2_RECIPE


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=240)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument(
        "--spectrum", choices=["random", "power"], default="random",
        help="FC-2 weight: random init (flat spectrum: the SVD's worst case) or a trained-like "
        "power-law spectrum σ_i ∝ i^-0.5 (the randomized solver converges)",
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        csv = image_csv_fixture(tmp / "data", args.images)
        per_group = args.images // 8
        verify = args.images // 4
        (tmp / "r.yaml").write_text(RECIPE.format(csv=csv, per_group=per_group, verify=verify))
        torch.manual_seed(0)
        state = build_model("vgg11_paper", 4).state_dict()
        if args.spectrum == "power":
            power_law_fc2(state)
        torch.save(state, tmp / "ckpt.pt")

        recipe = load_recipe(tmp / "r.yaml")
        splits = load_splits(recipe)
        model = build_model("vgg11_paper", 4)
        model.load_state_dict(torch.load(tmp / "ckpt.pt", weights_only=True))
        trunk, _ = split_model(model.eval(), "classifier.3")
        idx = scoring_indices(splits["train"].groups, per_group=per_group)
        scoring = splits["train"].subset(np.concatenate([idx[0], idx[1]]))
        n_read = len(scoring) + len(splits["val"]) + len(splits["test"])
        t = time.perf_counter()
        for ds in (scoring, splits["val"], splits["test"]):
            compute_features(trunk, ds, progress=False)
        trunk_s = time.perf_counter() - t

        times = []
        for run in (1, 2):
            t = time.perf_counter()
            report = run_optimize(
                tmp / "ckpt.pt", tmp / "r.yaml", out=tmp / f"run{run}", exports_dir=tmp / "exp",
                latency=False, progress=False, echo=lambda s: None,
            )
            times.append(time.perf_counter() - t)
            assert report["verify"]["passed"]
        print(
            f"vgg11_paper, {n_read} images read (of {args.images}), {args.threads} threads, "
            f"FC-2 spectrum {args.spectrum}"
        )
        print(f"trunk pass (baseline):       {trunk_s:8.2f} s")
        print(f"optimize, empty cache:       {times[0]:8.2f} s  = {times[0] / trunk_s:.2f}× trunk "
              "(target ≤ 1.3)")
        print(f"optimize, persisted cache:   {times[1]:8.2f} s  = {times[1] / times[0]:.2f}× run 1 "
              "(target ≤ 0.2)")


if __name__ == "__main__":
    main()
