"""Compression accounting: the paper's numbers, and a count of a real processed model."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fairdeploy.compression import break_even_rank, layer_table, theoretical_cr
from fairdeploy.errors import FairDeployError
from fairdeploy.lrf import FactorizedLinear, factorize_model, replace_module, sparsify
from fairdeploy.models import build_model
from fairdeploy.plan import LayerPlan, Plan


def _vgg_meta(num_classes: int) -> nn.Module:
    with torch.device("meta"):
        return build_model("vgg11_paper", num_classes)


FC2 = "classifier.3"


@pytest.mark.parametrize(
    ("classes", "plan", "paper"),
    [
        (2, Plan("truncated_svd", (LayerPlan(FC2, 1),)), 1.596),  # Table 1
        (114, Plan("truncated_svd", (LayerPlan(FC2, 64),)), 1.559),  # Table 2
        (114, Plan("slr_w", (LayerPlan(FC2, 64, sr=0.5, rr=0.5),)), 1.566),
        (114, Plan("slr_a", (LayerPlan(FC2, 64, sr=0.5, rr=0.5),)), 1.566),
        (114, Plan("fairlrf", (LayerPlan(FC2, 64, sr=0.4, rr=0.0, beta=5 / 9),)), 1.570),
        (114, Plan("fairquantize", quantize_ratio=0.1), 1.081),
        (114, Plan("fairquantize", quantize_ratio=0.2), 1.176),
        (114, Plan("fairprune", prune_ratio=0.35), 1.000),
        (114, Plan("vanilla"), 1.000),
    ],
)
def test_paper_compression_rates(classes: int, plan: Plan, paper: float) -> None:
    assert theoretical_cr(_vgg_meta(classes), plan) == pytest.approx(paper, abs=1e-3)


def test_vgg_fc2_by_hand() -> None:
    # VGG-11 (no BN) with a 4608-wide classifier input: count every parameter by hand.
    convs = [(3, 64), (64, 128), (128, 256), (256, 256), (256, 512), (512, 512), (512, 512),
             (512, 512)]  # fmt: skip
    classes = 114
    total = sum(9 * a * b + b for a, b in convs)
    total += 4608 * 4096 + 4096 + 4096 * 4096 + 4096 + 4096 * classes + classes
    k, sel, removed = 64, 1638, 64  # sr = 0.4 of 4096, rr = 0 removes all 64 entries
    fc2_after = 4096 * k + k * k + k * 4096 + 4096 - 2 * sel * removed
    processed = total - (4096 * 4096 + 4096) + fc2_after
    plan = Plan("fairlrf", (LayerPlan(FC2, k, sr=0.4, rr=0.0),))
    assert theoretical_cr(_vgg_meta(classes), plan) == pytest.approx(total / processed, rel=1e-12)
    (row,) = layer_table(_vgg_meta(classes), plan)
    assert row == {
        "name": FC2,
        "din": 4096,
        "dout": 4096,
        "k": 64,
        "rows_sparsified": 1638,
        "cols_sparsified": 1638,
        "keep": 0,
        "params_before": 4096 * 4096 + 4096,
        "params_after": fc2_after,
        "params_stored": fc2_after - k * k + k,
    }


def test_truncated_svd_refuses_sr_rr_it_would_ignore() -> None:
    # A setting that is accepted and then ignored gives a wrong comparison: refuse it.
    for kwargs in ({"sr": 0.5}, {"rr": 0.5}, {"beta": 0.3}):
        with pytest.raises(FairDeployError, match=r"layers\[0\]\.(sr|rr|beta): .* truncated_svd"):
            Plan("truncated_svd", (LayerPlan(FC2, 64, **kwargs),))


def _count_processed(model: nn.Module, *, s_as_matrix: bool) -> int:
    """Nonzero entries of U and V, S as k×k (paper) or k values, everything else dense."""
    n = 0
    factorized = {id(p) for m in model.modules() if isinstance(m, FactorizedLinear)
                  for p in m.parameters()}  # fmt: skip
    for m in model.modules():
        if isinstance(m, FactorizedLinear):
            k = m.rank
            n += int(torch.count_nonzero(m.U)) + int(torch.count_nonzero(m.V))
            n += k * k if s_as_matrix else k
            n += 0 if m.bias is None else m.bias.numel()
    n += sum(p.numel() for p in model.parameters() if id(p) not in factorized)
    return n


def test_theoretical_cr_counts_a_real_factorized_sparsified_model() -> None:
    torch.manual_seed(0)
    model = build_model("mlp", 3, in_features=20, widths=(32, 24))
    plan = Plan(
        "fairlrf",
        (LayerPlan("layers.0", 8, sr=0.5, rr=0.25), LayerPlan("layers.2", 6, sr=0.3, rr=0.0)),
    )
    processed = factorize_model(model, plan)
    for lp in plan.layers:
        f = processed.get_submodule(lp.layer)
        n_rows, n_cols = int(lp.sr * f.in_features), int(lp.sr * f.out_features)
        # Any rows/columns do: the count depends only on how many are selected.
        rows = torch.randperm(f.in_features)[:n_rows]
        cols = torch.randperm(f.out_features)[:n_cols]
        processed = replace_module(processed, lp.layer, sparsify(f, lp.sr, lp.rr, rows, cols))
    vanilla = sum(p.numel() for p in model.parameters())
    paper = _count_processed(processed, s_as_matrix=True)
    assert theoretical_cr(model, plan) == pytest.approx(vanilla / paper, rel=1e-12)
    table = layer_table(model, plan)
    stored = _count_processed(processed, s_as_matrix=False)
    assert vanilla - sum(r["params_before"] - r["params_stored"] for r in table) == stored
    assert [r["rows_sparsified"] for r in table] == [10, 9]
    assert [r["cols_sparsified"] for r in table] == [16, 7]
    assert [r["keep"] for r in table] == [2, 0]


def test_non_lrf_methods_have_empty_layer_table() -> None:
    assert layer_table(_vgg_meta(2), Plan("fairquantize", quantize_ratio=0.1)) == []


def test_break_even_rank() -> None:
    assert break_even_rank(4096, 4096) == 2048
    assert break_even_rank(30, 20) == pytest.approx(12.0)


def test_errors_name_the_layer_and_rank() -> None:
    model = build_model("mlp", 3, in_features=20, widths=(32,))
    with pytest.raises(FairDeployError, match=r"rank 21 for layer 'layers.0'.*1 ≤ rank ≤ 20"):
        theoretical_cr(model, Plan("truncated_svd", (LayerPlan("layers.0", 21),)))
    with pytest.raises(FairDeployError, match=r"'layers.1' is a ReLU.*layers\.0, layers\.2"):
        theoretical_cr(model, Plan("truncated_svd", (LayerPlan("layers.1", 2),)))
