"""The ``compare`` command without click, with its row exporter.

:func:`run_compare` evaluates every plan and exports its rows: a background thread writes
and verifies rows while the next is built, holding at most ``_IN_FLIGHT_BYTES`` of them.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fairdeploy.commands._common import (
    DEFAULT_EXPORTS,
    Echo,
    _experiment,
    _paths,
    _run_name,
    warnings_as_notes,
)
from fairdeploy.commands._deploy import (
    _failed_line,
    _record_export,
    _reference_kind,
    _require_verified,
)
from fairdeploy.commands._rows import _evaluate_plans, _Rows
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment
from fairdeploy.export import Exporter
from fairdeploy.methods import Processed
from fairdeploy.metrics import GroupMetrics
from fairdeploy.plan import Plan
from fairdeploy.recipe import load_recipe, save_resolved_recipe
from fairdeploy.report import verify_summary, write_report, write_tradeoff_plot
from fairdeploy.rundir import check_out, staging_dir

__all__ = [
    "CompareResult",
    "run_compare",
]


@dataclass(frozen=True)
class CompareResult:
    """A finished ``compare`` run: one row per plan (the first is vanilla).

    ``plans``, ``metrics`` (test split) and ``metrics_val`` (validation split) are keyed
    by row name (the method's name, with ``-2``, ``-3`` … for repeated methods).
    ``skipped`` lists the plans that could not run here and why.
    """

    run_dir: Path
    plans: dict[str, Plan]
    metrics: dict[str, GroupMetrics]
    metrics_val: dict[str, GroupMetrics]
    skipped: dict[str, str]
    report: dict[str, Any]


def _row_folder(name: str, taken: set[str]) -> str:
    """A folder name for a compare row (``_tiny_method:Magic`` → ``_tiny_method-Magic``)."""
    base = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip(".") or "row"
    folder, i = base, 2
    while folder in taken:
        folder, i = f"{base}-{i}", i + 1
    taken.add(folder)
    return folder


def _deploy_rows(
    exp: Experiment, rows: _Rows, report: dict[str, Any], run: Path, echo: Echo
) -> None:
    """Export and verify every compare row into ``<run>/<row>/model.onnx`` (vanilla first:
    the other rows' measured C.R. is against its export); fills each method entry's
    ``compression.measured`` and ``artifact``, and the report's ``artifacts`` summary.

    Every row is exported through one :meth:`Experiment.exporter
    <fairdeploy.experiment.Experiment.exporter>`, so rows of one structure share a traced
    graph, with its file write and the checks that verifying it repeats deferred
    (:meth:`~fairdeploy.export.Exporter.export`'s ``defer``); the write, the packing's
    bit-for-bit check and the row's verification (file I/O and ONNX Runtime, which release
    the GIL) run in a background thread while the next rows are traced and exported (as
    many as ``_IN_FLIGHT_BYTES`` of serialized files allow). Results are taken in export
    order (:func:`_export_order`); a row that fails them is exported again with every check
    in place and verified again (said in one line), and one that still fails stops the
    command with the check's own message."""
    from concurrent.futures import ThreadPoolExecutor

    n = len(exp.test_inputs(exp.recipe.export.verify_samples)[1])
    entries = {m["name"]: m for m in report["methods"]}
    taken: set[str] = set()
    folders = {name: _row_folder(name, taken) for name in rows.names}  # in table order
    vanilla: dict[str, int] | None = None  # the vanilla row's sizes: the baseline of ratios
    vanilla_path: str | None = None
    pending: list[_PendingRow] = []
    exporter = exp.exporter()  # one for every row: their traced graphs are shared
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="fairdeploy-verify") as pool:
        try:
            for name, processed in _export_order(rows):
                # Rows in flight hold their serialized model: _IN_FLIGHT_BYTES of them.
                _finish_verified_rows(exp, pending, n, echo, wait=False,
                                      max_bytes=_IN_FLIGHT_BYTES)
                folder = folders[name]
                path = run / folder / "model.onnx"
                echo(f"exporting and verifying {name} -> {folder}/model.onnx ...")
                row = _PendingRow(entries[name], folder, path, processed, vanilla, exporter)
                res = row.export(exp, defer=True)
                if vanilla is None:  # the first row is vanilla: the reference of every ratio
                    vanilla, vanilla_path = res.sizes, f"{folder}/model.onnx"
                row.sizes = res.sizes
                row.future = pool.submit(_finished_and_verified, exp, res, path)
                pending.append(row)
                del res  # its bytes now belong to the background task alone
            _finish_verified_rows(exp, pending, n, echo, wait=True)
        except BaseException:
            for row in pending:
                if row.future is not None:
                    row.future.cancel()
            raise
    report["artifacts"] = {
        "note": _artifacts_note(exp, [m["artifact"]["verify"] for m in report["methods"]
                                      if m.get("artifact")], n),
        "vanilla": vanilla_path,
    }


def _artifacts_note(exp: Experiment, blocks: list[dict[str, Any]], n: int) -> str:
    """What the rows' verification did: on how many inputs (each row's model.verify.npz,
    which may hold fewer than ``export.verify_samples``) and in which runtimes."""
    from fairdeploy.report import runtimes_text

    counts = sorted({b["samples"] for b in blocks})
    runtimes = runtimes_text({"runtimes": exp.recipe.export.verify_runtimes})
    if counts == [n]:
        inputs = f"{n:,} real test inputs"
    else:
        shown = f"{counts[0]:,}" if len(counts) == 1 else f"{counts[0]:,} to {counts[-1]:,}"
        inputs = (
            f"the {shown} real test inputs its model.verify.npz holds (the first of the "
            f"{n:,} of export.verify_samples that fit in export.verify_npz_max_mb = "
            f"{exp.recipe.export.verify_npz_max_mb:g} MB)"
        )
    return (
        f"every row exported to ONNX and verified against PyTorch in {runtimes} on {inputs}; "
        "measured C.R. is against the vanilla row's export"
    )


#: Bytes of serialized rows that compare holds while the background thread writes and
#: verifies them; beyond, the next row waits.
_IN_FLIGHT_BYTES = 1 << 30


def _export_order(rows: _Rows) -> list[tuple[str, Processed]]:
    """The rows in the order they are exported: vanilla first (the baseline of the measured
    C.R.), then the rows stored packed (ONNX Runtime folds their rebuild graphs when it
    loads them: the slowest to verify, so they verify while the others export), then the
    rest in table order."""
    pairs = list(zip(rows.names, rows.processed, strict=True))

    def packed(pair: tuple[str, Processed]) -> bool:
        plan = pair[1].plan
        return bool(plan.implementation.packing(plan, pair[1]))

    return pairs[:1] + sorted(pairs[1:], key=lambda pair: not packed(pair))


@dataclass
class _PendingRow:
    """A compare row on its way to disk: what it is, where it goes, and its verification
    (a future of the background thread)."""

    entry: dict[str, Any]
    folder: str
    path: Path
    processed: Processed
    baseline: dict[str, int] | None  # the vanilla row's sizes; None for the vanilla row
    exporter: Exporter  # compare's, shared by every row
    future: Any = None
    sizes: dict[str, int] = field(default_factory=dict)  # of its file, as exported

    @property
    def nbytes(self) -> int:
        """Bytes of its file: held in memory until the background thread writes it."""
        return self.sizes.get("file_bytes", 0)

    def export(self, exp: Experiment, *, defer: bool) -> Any:
        """Export the row (its entry records the measured compression and the file)."""
        ones = dict.fromkeys(("initializer_cr", "file_cr", "parameter_cr"), 1.0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", category=(DeprecationWarning, FutureWarning))
            if self.baseline is None:  # vanilla: every ratio 1 by definition
                meta = exp.metadata(self.processed) | {"measured_cr": ones}
                res = exp.export(self.processed, self.path, metadata=meta,
                                 exporter=self.exporter, defer=defer)
            else:
                res = exp.export(self.processed, self.path, baseline=self.baseline,
                                 exporter=self.exporter, defer=defer)
        _record_export(self.entry, res, res.measured_cr or ones)
        self.entry["artifact"] = {"path": f"{self.folder}/model.onnx", "sizes": res.sizes}
        return res


def _finished_and_verified(exp: Experiment, res: Any, path: Path) -> Any:
    """What a deferred export left to do (its checks, then the write), then
    :meth:`Experiment.verify` of the file."""
    if res.finish is not None:
        res.finish()
    return exp.verify_all(path)


def _finish_verified_rows(
    exp: Experiment, pending: list[_PendingRow], n: int, echo: Echo, *, wait: bool,
    max_bytes: int | None = None,
) -> None:
    """Record the verification of the pending rows in export order: all of them
    (``wait``), else those already done and, waiting for them, the oldest while the pending
    rows' files add up to more than ``max_bytes``. A row whose write, deferred checks or
    verification failed is exported again with every check in place (one line says so)
    and verified again; the first that still fails stops the command."""

    def over_budget() -> bool:
        return max_bytes is not None and sum(r.nbytes for r in pending) > max_bytes

    while pending and (wait or pending[0].future.done() or over_budget()):
        row = pending.pop(0)
        try:
            vres, why = row.future.result(), ""
        except Exception as exc:  # redone below with every check: its error says what failed
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            vres, why = None, f"{type(exc).__name__}: {first}"
        if not vres:
            why = why or _failed_line(vres)  # no exception: a verification that failed
            echo(f"{row.entry['label']}: its deferred checks or verification failed ({why}); "
                 "exporting it again with every check in place ...")
            redone = row.export(exp, defer=False)
            if row.baseline is None and redone.sizes != row.sizes:  # pragma: no cover
                raise FairDeployError(
                    "the vanilla row's export changed size when exported again, so the other "
                    "rows' measured C.R. is stale: run compare again"
                )
            vres = exp.verify_all(row.path)
        summary = verify_summary(vres, exp.recipe.export.tolerances, n)
        summary["details"]["reference"] = f"{row.folder}/model.verify.npz"
        summary["reference_outputs"] = _reference_kind(row.processed)
        row.entry["artifact"]["verify"] = summary
        _require_verified(vres, row.entry)


def run_compare(
    checkpoint: str | Path,
    recipe_path: str | Path,
    *,
    exports_dir: str | Path = DEFAULT_EXPORTS,
    out: str | Path | None = None,
    device: str = "cpu",
    trust_checkpoint: bool = False,
    cache_dir: str | Path | None = "default",
    progress: bool = True,
    echo: Echo = print,
) -> CompareResult:
    """The paper's table for the user's model: every plan of ``recipe.compare`` (each
    complete on its own) on the same cached features, every row exported to ONNX and
    verified, with theoretical and measured C.R., paired bootstrap intervals against
    vanilla and against truncated SVD at the same ranks, and the validation-split
    figures to choose on.

    Writes into ``out`` (default ``exports/<recipe>-compare-<hash>``): ``<row>/model.onnx``
    (+ ``model.verify.npz``) for every row, ``report.json``, ``report.md``,
    ``tradeoff.png`` (Avg. precision against EOpp1 and EOdd per method) and the resolved
    ``recipe.yaml``. Latency is not timed here: ``fairdeploy bench <row>/model.onnx
    --baseline vanilla/model.onnx`` times any row against vanilla.
    """
    recipe_path, exports_dir, cache_dir = _paths(recipe_path, exports_dir, cache_dir, out)
    recipe = load_recipe(recipe_path)
    if recipe.export.quantize != "none":
        # compare exports every row in float: a setting it would ignore is refused.
        raise FairDeployError(
            f"{recipe_path}: export.quantize: {recipe.export.quantize} is read by optimize "
            "only (compare exports every row in float and writes no int8 model): run "
            "fairdeploy optimize for the int8 model, or set export.quantize: none to compare"
        )
    plans, skipped = [], {}
    for plan in recipe.plans:
        reason = plan.implementation.unavailable
        if reason:
            echo(f"skipping {plan.method}: {reason}")
            skipped[plan.method] = reason
        else:
            plans.append(plan)
    exp = _experiment(
        recipe, checkpoint, cache_dir=cache_dir, device=device, progress=progress,
        trust_checkpoint=trust_checkpoint,
    )
    with warnings_as_notes() as prepare_notes:
        exp.prepare(plans)
    final = Path(out) if out is not None else exports_dir / _run_name(
        recipe_path, recipe, "compare", exp.checkpoint_sha256
    )
    check_out(final)
    unread = recipe.report.changed_fields()  # compare reads none of report:
    if unread:  # the same recipe serves optimize, which reads them: said, not refused
        note = (f"report.{', report.'.join(unread)}: read by optimize, which times latency; "
                "compare times none (fairdeploy bench <row>/model.onnx does)")
        echo(f"note: {note}")
        prepare_notes.append(note)
    rows = _evaluate_plans(
        exp, recipe_path, recipe.method, plans, echo, validation=True, notes=prepare_notes
    )
    report = rows.report
    if skipped:
        report["skipped"] = skipped
    with staging_dir(final) as run:
        _deploy_rows(exp, rows, report, run, echo)
        report["plot"] = write_tradeoff_plot(report, run / "tradeoff.png")
        save_resolved_recipe(recipe, run / "recipe.yaml", relative_to=final)
        write_report(report, run)
    report["run_dir"] = str(final)
    return CompareResult(
        run_dir=final,
        plans={n: p.plan for n, p in zip(rows.names, rows.processed, strict=True)},
        metrics=rows.metrics,
        metrics_val=rows.metrics_val,
        skipped=skipped,
        report=report,
    )
