"""``export_onnx``: a FactorizedLinear model to a really smaller ONNX file, checked."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import os
import re
import warnings
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from torch import nn

from fairdeploy._io import atomic_path
from fairdeploy.comparison import DEFAULT_ATOL, DEFAULT_RTOL
from fairdeploy.errors import FairDeployError
from fairdeploy.export._layout import LayerLayout, prepare_for_export, sparse_layout_name
from fairdeploy.export._metadata import (
    METADATA_PREFIX,
    SINGLE_FILE_LIMIT,
    encode_metadata,
    save_atomic,
    set_metadata,
    update_metadata,
)
from fairdeploy.export._sizes import _tensor_sizes, onnx_sizes, proto_sizes, size_ratios

__all__ = [
    "EXPORTERS",
    "ExportOptions",
    "ExportResult",
    "Exporter",
    "export_onnx",
    "verify_npz_path",
]

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
#: Graph builders :func:`export_onnx` offers. ``dynamo`` (``torch.export``) is the default:
#: it is the exporter PyTorch keeps, while the TorchScript one warns that it will be removed.
EXPORTERS = ("dynamo", "torchscript")
#: The dynamo exporter builds opset-18 graphs; asking for an older opset runs ONNX's version
#: converter, which drops the per-node module scopes the layer benchmark relies on.
DYNAMO_MIN_OPSET = 18
# Node metadata the dynamo exporter writes that is kept: the module scope of each node
# (read by fairdeploy.bench.layer_nodes). Its stack traces and FX node dumps hold paths of
# the machine that exported and are dropped.
_KEPT_NODE_METADATA = ("pkg.torch.onnx.name_scopes",)


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export_onnx` (or :meth:`Exporter.export`) wrote. ``packing``,
    ``measured_cr`` and ``finish`` are filled by the exporter's ``packing``,
    ``baseline_sizes`` and ``defer`` only: None after :func:`export_onnx`.

    Attributes
    ----------
    path : Path
        The ONNX model (written once ``finish`` has run, with ``defer``).
    reference_path : Path or None
        The ``<name>.verify.npz`` written beside it (None without reference inputs).
    layers : list of LayerLayout
        One record per factorized layer (shapes, kept rows/cols, stored parameters).
    max_abs_error : float or None
        Max |ONNX Runtime − PyTorch| on the reference inputs, checked at export (None
        with ``defer``: the caller verifies the file).
    simplified : bool
        Whether onnxsim simplification was applied (and re-checked).
    sparse_layout : {"blocks", "zeros"}
        How structured-sparse factors are stored.
    eliminate_dead : bool
        Whether dead-neuron elimination was asked for (per-layer results, and the reason
        where it was refused, are in ``layers``).
    deployed_params : int or None
        Parameters (weights and biases) of the exported layout: the tensors the graph
        is built from, after block storage and dead-neuron elimination. Equal to
        :func:`fairdeploy.export.deployed_params` from shapes.
    vanilla_params : int or None
        Parameters of the same model with every factorized layer dense again
        (``Din·Dout + bias``): the vanilla model's count.
    stored_elements : int or None
        Elements of the written graph's floating-point initializers, what the file
        actually stores: ``deployed_params`` for a model without BatchNorm; the exporter
        also stores BatchNorm running statistics (or folds a BatchNorm into the
        convolution before it) and stores identical tensors once.
    packing : PackReport or None
        What :func:`~fairdeploy.export.pack_weights` stored compactly (pruned / partly-int8
        weights), when the export was asked to pack; None otherwise.
    sizes : dict or None
        :func:`~fairdeploy.export.onnx_sizes` of the written file.
    measured_cr : dict or None
        ``initializer_cr``, ``file_cr``, ``parameter_cr`` against ``baseline_sizes`` (also
        in the file's metadata), when they were given.
    finish : callable or None
        With ``defer``: writes the file (atomically) after running the packed weights'
        bit-for-bit rebuild check (``RuntimeError`` on a mismatch), for the caller to call
        once, from any thread; None otherwise (the file is written).
    """

    path: Path
    reference_path: Path | None
    layers: list[LayerLayout] = field(default_factory=list)
    max_abs_error: float | None = None
    simplified: bool = False
    sparse_layout: str = "blocks"
    eliminate_dead: bool = False
    deployed_params: int | None = None
    vanilla_params: int | None = None
    stored_elements: int | None = None
    packing: Any = None
    sizes: dict[str, int] | None = None
    measured_cr: dict[str, float] | None = None
    finish: Callable[[], None] | None = field(default=None, repr=False, compare=False)

    @property
    def deployed_cr(self) -> float | None:
        """Deployed C.R.: ``vanilla_params / deployed_params`` (whole model)."""
        if not self.deployed_params or self.vanilla_params is None:
            return None
        return self.vanilla_params / self.deployed_params

    @property
    def eliminated(self) -> dict[str, dict[str, int]]:
        """Per factorized layer: input and output features dead-neuron elimination removed."""
        return {
            lay.layer: {"inputs": lay.eliminated_inputs, "outputs": lay.eliminated_outputs}
            for lay in self.layers
        }


# Real inputs checked at export time (layout and ONNX Runtime vs PyTorch).
_EXPORT_CHECK = 32


def verify_npz_path(onnx_path: str | os.PathLike[str]) -> Path:
    """The reference file export writes beside a model: ``model.onnx`` → ``model.verify.npz``."""
    p = Path(onnx_path)
    return p.with_name(p.stem + ".verify.npz")


def capped_reference(
    arrays: Mapping[str, np.ndarray], max_bytes: int | None
) -> dict[str, np.ndarray]:
    """The first rows of every array that fit in ``max_bytes`` (at least one row).

    Images make a large reference (3×112×112 float32 is 147 KB a sample): beyond the cap
    the file keeps a prefix of the samples, and ``samples_total`` (a 0-d array) says how
    many the full reference had. Rows are cut, never rounded (float16 inputs would no
    longer reproduce the stored outputs).
    """
    out = dict(arrays)
    n = len(out["inputs"])
    row = sum(a[:1].nbytes for a in out.values() if a.ndim)
    if max_bytes is None or n == 0 or row * n <= max_bytes:
        return out
    keep = max(1, int(max_bytes // max(row, 1)))
    out = {k: a[:keep] if a.ndim else a for k, a in out.items()}
    out["samples_total"] = np.asarray(n, dtype=np.int64)
    return out


def _save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    with atomic_path(path, suffix=".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _torchscript_export(ready: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """TorchScript-based export (``dynamo=False``): deprecated in PyTorch, kept as an option
    (faster here, any opset from 13)."""
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            ready,
            (example,),
            buf,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=opset,
            do_constant_folding=True,
        )
    return onnx.load_from_string(buf.getvalue())


def _dynamo_export(ready: nn.Module, example: torch.Tensor, opset: int) -> onnx.ModelProto:
    """``torch.export``-based export (``dynamo=True``) with the same graph contract as the
    TorchScript path: parameters keep their module names as initializer names (so every
    factor block is its own initializer, checked by :func:`check_factor_structure`), input
    ``input`` and output ``logits`` with a dynamic ``batch`` axis.

    The exporter's graph optimizer runs (constant folding, dead-code removal). It cannot
    re-fuse ``U`` and ``V``: the graph multiplies the input by ``U`` first, so no node
    takes both factors, and the structure check would catch it anyway. It does drop
    all-zero bias inputs (same outputs, fewer stored zeros). Node metadata other than the
    module scopes is removed (stack traces name files of the exporting machine).
    """
    # torch.export specializes a dimension whose example size is 0 or 1: trace with ≥ 2.
    trace_x = example if example.shape[0] >= 2 else example.expand(2, *example.shape[1:])
    batch = torch.export.Dim("batch")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.simplefilter("ignore", FutureWarning)
            program = torch.onnx.export(
                ready,
                (trace_x.contiguous(),),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_shapes=({0: batch},),
                opset_version=opset,
                optimize=True,
                verbose=False,
            )
    except torch.onnx.errors.OnnxExporterError as exc:
        raise FairDeployError(
            f"the dynamo exporter (torch.export) cannot export this model: {_why(exc)}. Make "
            "the forward traceable by torch.export, or set export.exporter: torchscript "
            "(exporter='torchscript'; deprecated by PyTorch)"
        ) from None
    proto = program.model_proto
    for node in proto.graph.node:
        kept = [p for p in node.metadata_props if p.key in _KEPT_NODE_METADATA]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)
    _restore_buffer_names(proto, ready)
    return proto


def _restore_buffer_names(proto: onnx.ModelProto, ready: nn.Module) -> None:
    """Give buffers the optimizer re-created as ``val_<n>`` constants their module names back.

    The exporter's constant folding turns ``Reshape(buffer)`` (how ``index_select`` is
    lowered) into a new constant with a generated name; the run-time Gather indices of a
    layer then read ``val_2`` instead of ``0.input_index``. A generated-name initializer
    whose values equal a buffer's is renamed to that buffer (each buffer once): names only,
    the computation is unchanged.
    """
    from onnx import numpy_helper

    inits = list(proto.graph.initializer)
    present = {t.name for t in inits}
    renames: dict[str, str] = {}
    for bname, buf in ready.named_buffers():
        if bname in present or buf.numel() < 2:  # a 1-element match could be a Slice bound
            continue
        want = buf.detach().cpu().numpy().ravel()
        for t in inits:
            generated = t.name.startswith("val_") and t.name not in renames
            if not generated or int(np.prod(t.dims)) != want.size:
                continue
            got = numpy_helper.to_array(t).ravel()
            if got.dtype == want.dtype and np.array_equal(got, want):
                renames[t.name] = bname
                break
    if not renames:
        return
    for t in inits:
        if t.name in renames:
            t.name = renames[t.name]
    for node in proto.graph.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]


def _why(exc: BaseException) -> str:
    """One line saying why torch.export failed: the underlying error and the user's line."""
    cause = exc.__cause__ or exc
    lines = [ln.strip() for ln in str(cause).splitlines() if ln.strip()]
    why = f"{type(cause).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    text = str(exc).splitlines()
    for i, ln in enumerate(text):
        if ln.startswith("The following call raised this error:") and i + 2 < len(text):
            why += f" (at {text[i + 1].strip()}: {text[i + 2].strip()})"
            break
    return re.sub(r"\x1b\[[0-9;]*m", "", why)


def _export_graph(
    ready: nn.Module, example: torch.Tensor, opset: int, exporter: str
) -> onnx.ModelProto:
    if exporter == "dynamo":
        return _dynamo_export(ready, example, opset)
    return _torchscript_export(ready, example, opset)


def _check_exporter(exporter: Any, opset: Any) -> None:
    if exporter not in EXPORTERS:
        raise FairDeployError(
            f"exporter={exporter!r} is unknown: use one of {', '.join(EXPORTERS)} "
            "(recipe key export.exporter)"
        )
    if exporter == "dynamo" and opset < DYNAMO_MIN_OPSET:
        raise FairDeployError(
            f"opset {opset} is not available with the dynamo exporter, which builds opset "
            f"{DYNAMO_MIN_OPSET} graphs (converting them down loses the module scopes of the "
            f"nodes): use export.opset ≥ {DYNAMO_MIN_OPSET}, or export.exporter: torchscript "
            "for older opsets"
        )


def _expected_blocks(ready: nn.Module, layouts: list[LayerLayout]) -> dict[str, tuple[int, ...]]:
    names = {lay.layer for lay in layouts}
    out: dict[str, tuple[int, ...]] = {}
    for pname, p in ready.named_parameters():
        # An all-zero block (e.g. a zero bias) may be optimized away: it stores nothing.
        if pname.rsplit(".", 1)[0] in names and bool(p.detach().any()):
            out[pname] = tuple(p.shape)
    return out


def check_factor_structure(
    model: onnx.ModelProto, ready: nn.Module, layouts: list[LayerLayout]
) -> None:
    """Every stored block of every factorized layer is an initializer of its own exact
    shape, and no initializer holds a rebuilt Din×Dout matrix of a factorized layer.

    Raises RuntimeError (a bug, not a user mistake) when the exporter or the simplifier
    has re-fused the factors.
    """
    inits = {t.name: tuple(int(d) for d in t.dims) for t in model.graph.initializer}
    shapes = list(inits.values())
    expected = _expected_blocks(ready, layouts)
    for name, shape in expected.items():
        if inits.get(name) == shape:
            continue
        if int(np.prod(shape)) == 0:
            continue  # an empty block may be folded away; it stores nothing either way
        if shape in shapes or tuple(reversed(shape)) in shapes:
            continue  # renamed, or transposed into a Gemm: same elements
        raise RuntimeError(f"factor block {name} {shape} is missing from the exported graph")
    for lay in layouts:
        for name, shape in inits.items():
            if expected.get(name) == shape:
                continue  # a block that is legitimately Din×k with k = Dout
            if name.startswith(lay.layer + ".") and int(np.prod(shape)) == lay.din * lay.dout:
                raise RuntimeError(
                    f"initializer {name} {shape} of factorized layer {lay.layer} holds a rebuilt "
                    f"{lay.din}×{lay.dout} matrix"
                )


def _ort_outputs(model_bytes: bytes, x: np.ndarray, batch: int = 256) -> np.ndarray:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    sess = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    outs = [sess.run(None, {INPUT_NAME: x[i : i + batch]})[0] for i in range(0, len(x), batch)]
    return np.concatenate(outs)


def _as_tensor(x: Any, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(x)
    if not isinstance(x, torch.Tensor):
        raise FairDeployError(f"{what} is a {type(x).__name__}: give a torch.Tensor or numpy array")
    if x.ndim < 2 or x.shape[0] < 1:
        raise FairDeployError(
            f"{what} has shape {tuple(x.shape)}: give a batch (N, ...) with N ≥ 1"
        )
    return x.float()


@dataclass(frozen=True)
class ExportOptions:
    """How :func:`export_onnx` builds and checks the graph (the recipe's ``export:`` keys).

    Attributes
    ----------
    sparse_layout : {"blocks", "zeros"} or bool
        ``"blocks"`` (or True, default): structured-sparse factors as real smaller blocks
        (``Slice`` + ``MatMul`` + ``Concat``), the permutations folded where possible.
        ``"zeros"`` (or False): the factors stored whole with their zeros: more bytes, no
        Slice/Concat (see the README for when each is faster). Stored as the name.
    fold_permutations : bool
        See :func:`fairdeploy.export.prepare_for_export`.
    eliminate_dead : bool
        Remove the neurons that whole zeroed rows of U / columns of V (``rr = 0``) leave
        dead in the neighbouring Linear layers (exact; see
        :func:`fairdeploy.export.prepare_for_export`). Off by default here so the graph
        keeps the paper's per-layer layout; the recipe key ``export.eliminate_dead`` turns
        it on for ``optimize``.
    simplify : bool
        Run onnxsim and keep its result only if the factors stay separate and the outputs
        still match.
    exporter : {"dynamo", "torchscript"}
        How the graph is built: ``torch.onnx.export(dynamo=True)`` (``torch.export``, the
        default: the exporter PyTorch keeps) or the TorchScript tracer (``dynamo=False``,
        deprecated by PyTorch; faster, any opset). Both give the same graph contract:
        factor blocks as separate initializers named after the parameters, input
        ``input``, output ``logits``, dynamic batch axis.
    opset : int
        ONNX opset (≥ 18 with the dynamo exporter).
    atol, rtol : float
        Tolerance of the export-time parity checks: ``|ONNX − PyTorch| ≤ atol + rtol·|ref|``.

    Raises FairDeployError when built with an unknown layout or exporter, or an opset the
    exporter does not write.
    """

    sparse_layout: str | bool = "blocks"
    fold_permutations: bool = True
    eliminate_dead: bool = False
    simplify: bool = False
    exporter: str = "dynamo"
    opset: int = 18
    atol: float = DEFAULT_ATOL
    rtol: float = DEFAULT_RTOL

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparse_layout", sparse_layout_name(self.sparse_layout))
        _check_exporter(self.exporter, self.opset)


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor | np.ndarray,
    path: str | os.PathLike[str],
    *,
    metadata: Mapping[str, Any] | None = None,
    reference_inputs: torch.Tensor | np.ndarray | None = None,
    labels: np.ndarray | None = None,
    groups: np.ndarray | None = None,
    options: ExportOptions | None = None,
) -> ExportResult:
    """Export a classifier to ONNX with factorized layers as real smaller MatMuls.

    A :class:`~fairdeploy.lrf.FactorizedLinear` becomes ``MatMul(Din×k) → MatMul(k×Dout)
    → Add(bias)`` with S folded into U, never a rebuilt Din×Dout matrix. Structured-sparse
    factors become smaller blocks (``Slice`` + ``MatMul`` + ``Concat``) so the initializers
    hold exactly the non-zero entries; the permutations that make the sparsified rows and
    columns contiguous are folded into the neighbouring Linear layers when only
    elementwise modules lie between, else applied with a ``Gather``. The batch axis is
    dynamic (input ``input``, output ``logits``).

    After export the graph is checked (``onnx.checker`` full check; every factor block
    stored on its own; ONNX Runtime matches PyTorch on ``example_input`` and the first
    reference inputs within ``atol + rtol·|ref|``), then written atomically.

    Parameters
    ----------
    model : nn.Module
        The classifier (not modified; exported in eval mode).
    example_input : Tensor or ndarray
        A batch of inputs, shape (N, ...), used for tracing and a first parity check.
    path : path-like
        Where to write the ``.onnx`` file.
    metadata : mapping, optional
        Stored in ``metadata_props`` under ``fairdeploy.<key>`` as JSON (see
        :func:`read_metadata` for the documented keys). ``layers`` (the export layout),
        ``producer`` and ``version`` are filled in.
    reference_inputs : Tensor or ndarray, optional
        Real inputs: their PyTorch outputs are written to ``<name>.verify.npz`` (arrays
        ``inputs``, ``outputs`` and, when given, ``labels`` and ``groups``) for
        :func:`fairdeploy.verification.verify`.
    labels, groups : ndarray, optional
        Targets and group ids of ``reference_inputs`` (verify then reports group fairness
        of the ONNX model's predictions).
    options : ExportOptions, optional
        Layout, exporter, opset, simplification and check tolerances (default:
        ``ExportOptions()``).

    Returns
    -------
    ExportResult
    """
    exporter = Exporter(options, reuse_graphs=False)
    return exporter.export(
        model, example_input, path, metadata=metadata, reference_inputs=reference_inputs,
        labels=labels, groups=groups,
    )


class Exporter:
    """Exports one model after another with the same :class:`ExportOptions`: what
    :func:`export_onnx` does, plus what a caller exporting many models needs for speed.

    Internal to fairdeploy's commands (``compare`` holds one for its rows). Beyond
    :func:`export_onnx` it offers:

    - **graph reuse** (``reuse_graphs``): exported graphs are kept by structure. A model
      whose rearranged layout has the same modules, parameter shapes, buffers and export
      options as one exported before reuses that graph with its own weights put in place
      of the initializers named after its parameters — the same bytes a fresh export
      writes, without tracing again (``compare``'s vanilla, FairPrune and FairQuantize rows
      share one graph, as do its SLR-w and SLR-a rows). ONNX Runtime's parity check runs on
      a reused graph as on a fresh one (unless ``defer``); one that fails it is exported
      afresh;
    - per export, ``reference_outputs`` (PyTorch's outputs for the reference inputs when
      the caller has them, e.g. the head run on cached trunk features), ``packing``,
      ``baseline_sizes`` and ``defer`` (see :meth:`export`);
    - ``reference_max_bytes``: a cap on the size of ``<name>.verify.npz``: only the first
      reference samples that fit are written (at least one), and ``samples_total`` records
      how many there were. None writes them all.
    """

    def __init__(
        self, options: ExportOptions | None = None, *, reference_max_bytes: int | None = None,
        reuse_graphs: bool = True,
    ) -> None:
        self.options = options if options is not None else ExportOptions()
        self.reference_max_bytes = reference_max_bytes
        #: Exported graphs by structure key, as skeletons (parameters without values);
        #: None without graph reuse.
        self.graphs: dict[str, onnx.ModelProto] | None = {} if reuse_graphs else None

    def export(
        self,
        model: nn.Module,
        example_input: torch.Tensor | np.ndarray,
        path: str | os.PathLike[str],
        *,
        metadata: Mapping[str, Any] | None = None,
        reference_inputs: torch.Tensor | np.ndarray | None = None,
        reference_outputs: torch.Tensor | np.ndarray | None = None,
        labels: np.ndarray | None = None,
        groups: np.ndarray | None = None,
        packing: Mapping[str, Any] | None = None,
        baseline_sizes: Mapping[str, int] | None = None,
        defer: bool = False,
    ) -> ExportResult:
        """:func:`export_onnx` of ``model`` with this exporter's options and graphs.

        ``reference_outputs``: PyTorch's outputs for ``reference_inputs`` when the caller
        already has them, so the full model need not run again. ``packing`` (mapping of
        str to PackSpec): weights to store compactly (pruned / partly-int8 entries); the
        graph is packed in memory with :func:`~fairdeploy.export.pack_weights` (checked bit
        for bit) before it is written, so the file is written once. ``baseline_sizes``
        (:func:`~fairdeploy.export.onnx_sizes` of the vanilla export): the measured C.R. of
        the written file against it goes into the metadata (``measured_cr``) in the same
        write, and into ``ExportResult.measured_cr``.

        ``defer`` returns before the model file is written, leaving to the caller what
        verifying the file repeats: the ``onnx.checker`` full check and the layout and ONNX
        Runtime parity checks (of a fresh or a reused graph) are skipped, and
        ``ExportResult.finish`` runs the packing's bit-for-bit rebuild check and writes the
        file (the serialized bytes are ready; ``sizes`` and ``measured_cr`` are those of
        the file it writes). The ``.verify.npz`` is written at once. For a caller that
        verifies the file at once on at least as many inputs and exports again without
        deferring when that fails: ``compare`` finishes and verifies each row in a
        background thread while the next row exports. ``max_abs_error`` is then None. With
        ``simplify`` the layout check still runs (onnxsim's result is checked against it);
        a model beyond 2 GB is written at once.
        """
        path = Path(path)
        if path.suffix != ".onnx":
            raise FairDeployError(f"output path {str(path)!r} must end in .onnx")
        example = _as_tensor(example_input, "example_input")
        ref_x = _reference_inputs(reference_inputs, labels, groups)
        ref_out = _reference_outputs(reference_outputs, ref_x)
        encoded = encode_metadata(dict(metadata or {}))
        opts = self.options
        ready, layouts = prepare_for_export(
            model,
            sparse_layout=opts.sparse_layout,
            fold_permutations=opts.fold_permutations,
            eliminate_dead=opts.eliminate_dead,
            example_input=example[:2],
        )
        original = model if not model.training else _eval_copy(model)
        checks = None
        if not defer or opts.simplify:
            checks = _check_layout(original, ready, example, ref_x, ref_out, opts.atol, opts.rtol)
        proto, simplified, max_err = _checked_graph(
            ready, example, layouts, checks, opset=opts.opset, exporter=opts.exporter,
            simplify=opts.simplify, atol=opts.atol, rtol=opts.rtol, graph_cache=self.graphs,
            check_runtime=not defer,
        )
        result = self._written(
            proto, path, model, ready, layouts, encoded, packing=packing,
            baseline_sizes=baseline_sizes, defer=defer,
        )
        del proto  # the bytes are what remains to write
        ref_path = None
        if ref_x is not None:
            ref_path = _write_reference(
                path, original, ref_x, ref_out, labels=labels, groups=groups,
                max_bytes=self.reference_max_bytes,
            )
        return dataclasses.replace(
            result, reference_path=ref_path, max_abs_error=max_err, simplified=simplified
        )

    def _written(
        self, proto: onnx.ModelProto, path: Path, model: nn.Module, ready: nn.Module,
        layouts: list[LayerLayout], encoded: Mapping[str, str], *,
        packing: Mapping[str, Any] | None, baseline_sizes: Mapping[str, int] | None,
        defer: bool,
    ) -> ExportResult:
        """Stamp ``proto``'s metadata, pack it when asked, and write it (or, with
        ``defer``, leave the write to the result's ``finish``): the result without its
        reference file and check outcomes, which :meth:`export` fills in."""
        opts = self.options
        deployed = sum(p.numel() for p in ready.parameters())
        stored = _float_initializer_elements(proto)
        vanilla = _vanilla_params(model, layouts)
        _stamp_producer(
            proto, encoded, layouts=layouts, layout=opts.sparse_layout, vanilla=vanilla,
            deployed=deployed, stored=stored, eliminate_dead=opts.eliminate_dead,
        )
        pack_report = pack_check = None
        if packing:
            from fairdeploy.export._packed import _pack

            pack_report, pack_check = _pack(proto, packing, check_now=not defer)
        sizes, cr, finish = _write_model(
            proto, path, baseline_sizes, check=not defer, defer=defer, first=pack_check
        )
        return ExportResult(
            path=path,
            reference_path=None,
            layers=layouts,
            sparse_layout=opts.sparse_layout,
            eliminate_dead=bool(opts.eliminate_dead),
            deployed_params=deployed,
            vanilla_params=vanilla,
            stored_elements=stored,
            packing=pack_report,
            sizes=sizes,
            measured_cr=cr,
            finish=finish,
        )


def _write_model(
    proto: onnx.ModelProto, path: Path, baseline: Mapping[str, int] | None, *, check: bool,
    defer: bool = False, first: Callable[[], None] | None = None,
) -> tuple[dict[str, int], dict[str, float] | None, Callable[[], None] | None]:
    """Write ``proto`` to ``path`` atomically, serialized once, with the measured C.R.
    against ``baseline`` in its metadata (the entry's own bytes count: it is written at a
    fixed width, so its values are those of the file that holds them); the ``onnx.checker``
    full check runs on the same bytes when ``check``, and ``first`` (a check that raises)
    just before the write. Returns the file's :func:`~fairdeploy.export.onnx_sizes`, the
    measured C.R. (None without ``baseline``) and, with ``defer``, the function that runs
    ``first`` and writes the file (else None: written). A model beyond one file's 2 GB is
    written at once, its weights in ``<name>.onnx.data``."""
    data = _serialized_if_one_file(proto, baseline is not None)
    if data is None:  # beyond 2 GB: weights in .onnx.data, the entry written afterwards
        if check:
            onnx.checker.check_model(proto, full_check=True)
        if first is not None:
            first()
        save_atomic(proto, path, size=SINGLE_FILE_LIMIT)
        sizes = onnx_sizes(path)
        cr = None if baseline is None else size_ratios({"vanilla": baseline, "processed": sizes})
        if cr is not None:
            update_metadata(path, {"measured_cr": cr})
            sizes = onnx_sizes(path)
        return sizes, cr, (_then() if defer else None)
    if check:  # the metadata's text is not the checker's concern: check before stamping
        onnx.checker.check_model(data, full_check=True)
    sizes = proto_sizes(proto, file_bytes=len(data))
    cr = None
    pieces: tuple[bytes | memoryview, ...] = (data,)
    if baseline is not None:
        cr = size_ratios({"vanilla": baseline, "processed": sizes})
        text = _measured_text(cr)
        set_metadata(proto, {_MEASURED_KEY: text})  # the proto says what the file says
        pieces = _replaced_once(data, _measured_text(None).encode(), text.encode())
    write = _then(first, functools.partial(_write_pieces, path, pieces))
    if defer:
        return sizes, cr, write
    write()
    return sizes, cr, None


def _write_pieces(path: Path, pieces: tuple[bytes | memoryview, ...]) -> None:
    """Write the concatenation of ``pieces`` to ``path`` atomically (one file: a stale
    ``<name>.onnx.data`` beside it is removed)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        for piece in pieces:
            f.write(piece)
    stale = path.with_name(path.name + ".data")
    if stale.exists():
        stale.unlink()


def _then(*steps: Callable[[], None] | None) -> Callable[[], None]:
    """One function that calls the given ones (None skipped) in order."""

    def run() -> None:
        for step in steps:
            if step is not None:
                step()

    return run


_MEASURED_KEY = METADATA_PREFIX + "measured_cr"


def _measured_text(cr: Mapping[str, float] | None) -> str:
    """The ``measured_cr`` metadata entry at a fixed width whatever its values (JSON allows
    the padding), so stamping it does not change the file's size; None: the placeholder
    written before the file's size is known (zeros)."""
    return "{" + ", ".join(
        f'"{k}": {0.0 if cr is None else cr[k]:20.{_CR_DECIMALS}f}'
        for k in ("file_cr", "initializer_cr", "parameter_cr")
    ) + "}"


def _replaced_once(data: bytes, old: bytes, new: bytes) -> tuple[memoryview, bytes, memoryview]:
    """``data`` with its one occurrence of ``old`` replaced by ``new`` (same length), as
    pieces to write one after the other (no copy of ``data``)."""
    i = data.find(old)
    if len(old) != len(new) or i < 0 or data.find(old, i + 1) >= 0:
        raise RuntimeError("the measured C.R. placeholder is not unique")  # pragma: no cover
    view = memoryview(data)
    return view[:i], new, view[i + len(old):]


def _serialized_if_one_file(proto: onnx.ModelProto, placeholder: bool) -> bytes | None:
    """``proto`` serialized (with the ``measured_cr`` placeholder when asked), or None when
    it is too large for one file (2 GB)."""
    if _tensor_sizes(proto)[0]["initializer_bytes"] >= SINGLE_FILE_LIMIT:
        return None
    if placeholder:
        set_metadata(proto, {_MEASURED_KEY: _measured_text(None)})
    data = proto.SerializeToString()
    return data if len(data) < SINGLE_FILE_LIMIT else None


#: Decimals of the ``measured_cr`` entry written at export (a fixed-length entry).
_CR_DECIMALS = 6


def _checked_graph(
    ready: nn.Module, example: torch.Tensor, layouts: list[LayerLayout],
    checks: tuple[torch.Tensor, np.ndarray] | None, *, opset: int, exporter: str,
    simplify: bool, atol: float, rtol: float, graph_cache: MutableMapping[str, Any] | None,
    check_runtime: bool = True,
) -> tuple[onnx.ModelProto, bool, float | None]:
    """The exported graph of ``ready`` (reused from ``graph_cache`` when a model of the same
    structure was exported before), its factor structure checked, simplified when asked,
    and ONNX Runtime's parity with the expected outputs of ``checks`` (inputs, outputs)
    checked unless ``check_runtime`` is off: (graph, simplified, max |Δ| or None). A reused
    graph that fails the parity check is exported afresh."""
    key = None if graph_cache is None else _graph_key(ready, example, opset, exporter, simplify)
    if key is not None and key in graph_cache:
        proto = _filled(graph_cache[key], ready)
        if proto is not None:
            try:
                check_factor_structure(proto, ready, layouts)
                if not check_runtime or checks is None:
                    return proto, simplify, None
                return proto, simplify, _check_ort_parity(proto, *checks, atol, rtol)
            except Exception:  # ONNX Runtime refused it or it computes something else:
                del graph_cache[key]  # not the same graph after all, export afresh
    proto = _export_graph(ready, example, opset, exporter)
    check_factor_structure(proto, ready, layouts)
    simplified = False
    if simplify and checks is not None:
        proto, simplified = _simplify(
            proto, ready, layouts, checks[0].numpy(), checks[1], atol, rtol
        )
    max_err = None
    if check_runtime and checks is not None:
        max_err = _check_ort_parity(proto, *checks, atol, rtol)
    if key is not None and simplified == simplify:
        skeleton = _skeleton(proto, ready)
        if skeleton is not None:
            graph_cache[key] = skeleton
    return proto, simplified, max_err


def _graph_key(
    ready: nn.Module, example: torch.Tensor, opset: int, exporter: str, simplify: bool
) -> str:
    """What determines the exported graph but the parameters' values: export settings,
    input shape, every module's type and plain attributes, every parameter's name, shape,
    dtype and whether it is all zero (the exporter drops all-zero biases), and every
    buffer's name and values (index buffers become graph constants)."""
    h = hashlib.sha256()
    h.update(repr((exporter, opset, simplify, tuple(example.shape[1:]), str(example.dtype)))
             .encode())
    plain = (bool, int, float, str, type(None))
    for name, mod in ready.named_modules():
        attrs = sorted(
            (k, repr(v)) for k, v in vars(mod).items()
            if isinstance(v, plain) or (
                isinstance(v, tuple | list) and all(isinstance(e, plain) for e in v)
            )
        )
        h.update(f"m {name} {type(mod).__module__}.{type(mod).__qualname__} {attrs}\n".encode())
    for name, p in ready.named_parameters():
        h.update(f"p {name} {tuple(p.shape)} {p.dtype} {bool(p.detach().any())}\n".encode())
    for name, b in ready.named_buffers():
        h.update(f"b {name} {tuple(b.shape)} {b.dtype}\n".encode())
        h.update(b.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def _skeleton(proto: onnx.ModelProto, ready: nn.Module) -> onnx.ModelProto | None:
    """``proto`` without the values of the initializers named after ``ready``'s parameters,
    or None when a non-zero parameter is not stored under its own name and shape (its
    values may have been folded into other constants: the graph cannot be reused)."""
    params = dict(ready.named_parameters())
    inits = {t.name: t for t in proto.graph.initializer}
    for name, p in params.items():
        t = inits.get(name)
        if t is None:
            if bool(p.detach().any()):
                return None
            continue
        if tuple(t.dims) != tuple(p.shape) or not t.HasField("raw_data"):
            return None
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        if t.name in params:
            t.ClearField("raw_data")
    return out


def _filled(skeleton: onnx.ModelProto, ready: nn.Module) -> onnx.ModelProto | None:
    """A copy of ``skeleton`` with ``ready``'s parameter values in their initializers (None
    when one does not fit: another dtype or shape)."""
    from onnx import helper

    params = dict(ready.named_parameters())
    proto = onnx.ModelProto()
    proto.CopyFrom(skeleton)
    for t in proto.graph.initializer:
        p = params.get(t.name)
        if p is None:
            continue
        arr = np.ascontiguousarray(p.detach().cpu().numpy())
        if arr.dtype != helper.tensor_dtype_to_np_dtype(t.data_type) or arr.shape != tuple(t.dims):
            return None
        t.raw_data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
    return proto


def _reference_inputs(
    reference_inputs: Any, labels: np.ndarray | None, groups: np.ndarray | None
) -> torch.Tensor | None:
    """The reference inputs as a float tensor (None without them); labels and groups,
    when given, must have one entry per reference input."""
    ref_x = None if reference_inputs is None else _as_tensor(reference_inputs, "reference_inputs")
    for name, arr in (("labels", labels), ("groups", groups)):
        if arr is not None and (ref_x is None or len(arr) != len(ref_x)):
            raise FairDeployError(
                f"{name} has {len(arr)} entries: give one per row of reference_inputs "
                f"({0 if ref_x is None else len(ref_x)})"
            )
    return ref_x


def _check_layout(
    original: nn.Module, ready: nn.Module, example: torch.Tensor, ref_x: torch.Tensor | None,
    ref_out: np.ndarray | None, atol: float, rtol: float,
) -> tuple[torch.Tensor, np.ndarray]:
    """The inputs of the export-time parity checks and the original model's outputs on
    them (the caller's reference outputs where given: the original model does not run on
    those again); the rearranged model (``ready``) must match them within tolerance."""
    with torch.no_grad():
        # A few real inputs suffice here: verify() compares every reference input later.
        if ref_x is None:
            check_x, expected = example, original(example).numpy()
        else:
            check_x = torch.cat([example, ref_x[:_EXPORT_CHECK]])
            known = (ref_out[:_EXPORT_CHECK] if ref_out is not None
                     else original(ref_x[:_EXPORT_CHECK]).numpy())
            expected = np.concatenate([original(example).numpy(), known.astype(np.float32)])
        ready_out = ready(check_x).numpy()
    layout_err = float(np.max(np.abs(ready_out - expected)))
    if not np.all(np.abs(ready_out - expected) <= atol + rtol * np.abs(expected)):
        raise _tolerance_error("the export layout (rearranged layers)", layout_err, atol, rtol)
    return check_x, expected


def _check_ort_parity(
    proto: onnx.ModelProto, check_x: torch.Tensor, expected: np.ndarray, atol: float,
    rtol: float,
) -> float:
    """ONNX Runtime's outputs of ``proto`` must match ``expected``; return the max |Δ|."""
    got = _ort_outputs(proto.SerializeToString(), check_x.numpy())
    err = np.abs(got - expected)
    if not np.all(err <= atol + rtol * np.abs(expected)):
        raise _tolerance_error("ONNX Runtime's output", float(err.max()), atol, rtol)
    return float(err.max())


def _stamp_producer(
    proto: onnx.ModelProto, encoded: Mapping[str, str], *, layouts: list[LayerLayout],
    layout: str, vanilla: int, deployed: int, stored: int, eliminate_dead: bool,
) -> None:
    """Producer name and version, and the metadata fairdeploy fills (layers, layout,
    deployed parameter counts) under the caller's ``encoded`` metadata."""
    from fairdeploy import __version__

    proto.producer_name = "fairdeploy"
    proto.producer_version = __version__
    base = {
        "producer": "fairdeploy",
        "version": __version__,
        "layers": [lay.to_dict() for lay in layouts],
        "sparse_layout": layout,
        "deployed": {
            "vanilla_params": vanilla,
            "deployed_params": deployed,
            "deployed_cr": vanilla / deployed if deployed else None,
            "stored_float_elements": stored,
            "eliminate_dead": bool(eliminate_dead),
        },
    }
    set_metadata(proto, {**encode_metadata(base), **encoded})


def _reference_outputs(reference_outputs: Any, ref_x: torch.Tensor | None) -> np.ndarray | None:
    """The caller's reference outputs as an array with one row per reference input (None
    without them, or without reference inputs)."""
    if reference_outputs is None or ref_x is None:
        return None
    outs = np.asarray(_as_tensor(reference_outputs, "reference_outputs").numpy())
    if len(outs) != len(ref_x):
        raise FairDeployError(
            f"reference_outputs has {len(outs)} rows: give one per reference input "
            f"({len(ref_x)})"
        )
    return outs


def _write_reference(
    path: Path, original: nn.Module, ref_x: torch.Tensor, ref_out: np.ndarray | None, *,
    labels: np.ndarray | None, groups: np.ndarray | None, max_bytes: int | None,
) -> Path:
    """Write ``<name>.verify.npz`` (inputs, PyTorch outputs, labels, groups; capped at
    ``max_bytes``) and return its path. The outputs are the caller's when given, else the
    original model's."""
    if ref_out is not None:
        outs = ref_out
    else:
        with torch.no_grad():
            outs = np.concatenate(
                [original(ref_x[i : i + 256]).numpy() for i in range(0, len(ref_x), 256)]
            )
    arrays: dict[str, np.ndarray] = {"inputs": ref_x.numpy(), "outputs": outs}
    if labels is not None:
        arrays["labels"] = np.asarray(labels)
    if groups is not None:
        arrays["groups"] = np.asarray(groups)
    ref_path = verify_npz_path(path)
    _save_npz_atomic(ref_path, capped_reference(arrays, max_bytes))
    return ref_path


def _float_initializer_elements(proto: onnx.ModelProto) -> int:
    """Elements of the floating-point initializers: the weights the graph stores."""
    from fairdeploy.export._sizes import _FLOAT_TYPES, _numel

    return sum(_numel(t) for t in proto.graph.initializer if t.data_type in _FLOAT_TYPES)


def _vanilla_params(model: nn.Module, layouts: list[LayerLayout]) -> int:
    """Parameters of ``model`` with every factorized layer counted as the dense Linear."""
    total = sum(p.numel() for p in model.parameters())
    for lay in layouts:
        layer = model.get_submodule(lay.layer)
        total += lay.dense_params - sum(p.numel() for p in layer.parameters())
    return total


def _tolerance_error(what: str, err: float, atol: float, rtol: float) -> FairDeployError:
    # Float32 sums in another order differ in the last bits: a zero tolerance cannot pass.
    return FairDeployError(
        f"{what} differs from PyTorch by {err:.3g}, more than export.tolerances allow "
        f"(atol={atol:g}, rtol={rtol:g}): float32 arithmetic in another order differs in the "
        "last bits, so use atol ≥ 1e-6 (the default is 1e-4); a difference far above that is "
        "a fairdeploy bug, please report it"
    )


def _eval_copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model).eval()


def _simplify(
    proto: onnx.ModelProto,
    ready: nn.Module,
    layouts: list[LayerLayout],
    x: np.ndarray,
    expected: np.ndarray,
    atol: float,
    rtol: float,
) -> tuple[onnx.ModelProto, bool]:
    """onnxsim, kept only if it leaves the factors separate and the outputs unchanged."""
    import onnxsim

    try:
        simple, ok = onnxsim.simplify(proto)
    except Exception as exc:  # onnxsim fails on some graphs; the unsimplified one is fine
        warnings.warn(f"onnxsim failed ({exc}); keeping the unsimplified graph", stacklevel=3)
        return proto, False
    if not ok:
        warnings.warn("onnxsim's own check failed; keeping the unsimplified graph", stacklevel=3)
        return proto, False
    try:
        check_factor_structure(simple, ready, layouts)
    except RuntimeError as exc:
        warnings.warn(
            f"onnxsim re-fused factors ({exc}); keeping the unsimplified graph", stacklevel=3
        )
        return proto, False
    got = _ort_outputs(simple.SerializeToString(), x)
    if not np.all(np.abs(got - expected) <= atol + rtol * np.abs(expected)):
        warnings.warn("onnxsim changed the outputs; keeping the unsimplified graph", stacklevel=3)
        return proto, False
    _copy_node_metadata(proto, simple)
    return simple, True


def _copy_node_metadata(source: onnx.ModelProto, target: onnx.ModelProto) -> None:
    """onnxsim rebuilds nodes without their metadata; give nodes it kept (same name and op)
    their module scopes back, which the per-layer benchmark reads."""
    by_name = {n.name: n for n in source.graph.node if n.name and n.metadata_props}
    for node in target.graph.node:
        old = by_name.get(node.name)
        if old is not None and old.op_type == node.op_type and not node.metadata_props:
            node.metadata_props.extend(old.metadata_props)
