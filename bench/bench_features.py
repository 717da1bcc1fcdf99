"""What the feature cache saves: the full model vs the head on cached features.

Runs in one process on random weights and inputs (the cost does not depend on them):
the full ``vgg11_paper`` at 112×112 over N samples (what evaluating one setting would
cost without the cache), the trunk once (``compute_features``, the cache's one-off
cost), the head alone over the cached features (what each setting of a sweep costs
with the cache), and a cache hit (``torch.load`` of the saved features). Prints the
times and the ratios against the full model.

    python bench/bench_features.py [--n 128] [--layer classifier.3] [--threads 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from fairdeploy.cache import FeatureCache
from fairdeploy.features import FeatureSet, compute_features, split_model
from fairdeploy.models import build_model


class _Images(torch.utils.data.Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 3, 112, 112, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], i % 2, (i // 2) % 2


def _time(fn, repeat: int = 3) -> float:
    """Median wall time of ``fn()`` over ``repeat`` runs, after one warm-up."""
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=64, help="samples")
    ap.add_argument("--layer", default="classifier.3")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_model("vgg11_paper", 2).eval()
    trunk, head = split_model(model, args.layer)
    data = _Images(args.n)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)

    def full() -> None:
        with torch.inference_mode():
            for x, _, _ in loader:
                model(x)

    fs = compute_features(trunk, data, batch_size=args.batch_size, progress=False)

    def on_head() -> None:
        with torch.inference_mode():
            for i in range(0, len(fs), args.batch_size):
                head(fs.features[i : i + args.batch_size])

    t_full = _time(full)
    t_trunk = _time(
        lambda: compute_features(trunk, data, batch_size=args.batch_size, progress=False)
    )
    t_head = _time(on_head)
    with tempfile.TemporaryDirectory() as d:
        cache = FeatureCache(d)
        parts = {"bench": args.layer, "n": args.n}

        def compute() -> FeatureSet:
            return fs

        cache.get_or_compute(parts, compute)
        t_hit = _time(lambda: cache.get_or_compute(parts, compute))

    print(f"vgg11_paper 112x112, N={args.n}, batch {args.batch_size}, "
          f"{args.threads} threads, cut at {args.layer} (features {tuple(fs.features.shape)})")
    print(f"  full model          {t_full:8.3f} s   1.00x")
    print(f"  trunk (cache fill)  {t_trunk:8.3f} s   {t_full / t_trunk:6.2f}x faster than full")
    print(f"  head on features    {t_head:8.3f} s   {t_full / t_head:6.1f}x faster than full")
    print(f"  cache hit (load)    {t_hit:8.3f} s   {t_full / t_hit:6.1f}x faster than full")
    sweep = 20
    print(f"  a sweep of {sweep} settings: {sweep * t_full:.1f} s without the cache, "
          f"{t_trunk + sweep * t_head:.1f} s with it "
          f"({sweep * t_full / (t_trunk + sweep * t_head):.1f}x)")


if __name__ == "__main__":
    main()
