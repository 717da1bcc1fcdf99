"""Safe checkpoint loading and saving.

:func:`load_checkpoint` reads a checkpoint with ``torch.load(weights_only=True)``, which
unpickles only tensors and plain containers, so a checkpoint cannot run code while it
loads. It accepts a bare state dict or a dict holding one under ``state_dict``,
``model_state_dict``, ``model`` or ``net`` (training scripts' usual layouts), strips the
``module.`` prefix of ``DataParallel``/``DistributedDataParallel`` and the ``_orig_mod.``
prefix of ``torch.compile``, builds the architecture by name
(:func:`fairdeploy.models.build_model`) and loads the weights strictly.

A checkpoint holding a whole pickled ``nn.Module`` is loaded only with
``trust_checkpoint=True`` (the CLI's ``--trust-checkpoint``): unpickling it runs
arbitrary code from the file.

:func:`save_checkpoint` writes the counterpart: a plain dict with ``state_dict`` and
``metadata``, loadable with ``weights_only=True``, written atomically.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fairdeploy._io import atomic_torch_save
from fairdeploy._text import non_finite
from fairdeploy.errors import FairDeployError, first_line
from fairdeploy.models import build_model

__all__ = ["check_plain_value", "checkpoint_metadata", "load_checkpoint", "save_checkpoint"]

_FORMAT = "fairdeploy-checkpoint"
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
_PREFIXES = ("module.", "_orig_mod.")
_SHOW = 5  # mismatching keys listed in an error


def load_checkpoint(
    path: str | os.PathLike[str],
    *,
    arch: str,
    num_classes: int,
    model_kwargs: Mapping[str, Any] | None = None,
    trust_checkpoint: bool = False,
) -> nn.Module:
    """Build ``arch`` and load a checkpoint's weights into it.

    Parameters
    ----------
    path : path-like
        A file written by ``torch.save``: a state dict, a dict holding one (under
        ``state_dict``, ``model_state_dict``, ``model`` or ``net``), or — only with
        ``trust_checkpoint`` — a whole pickled ``nn.Module``.
    arch : str
        Architecture name for :func:`fairdeploy.models.build_model` (``vgg11_paper``,
        ``mlp``, a torchvision name, or ``package.module:factory``).
    num_classes : int
        Output classes of the model.
    model_kwargs : mapping, optional
        Extra arguments of the architecture factory (e.g. ``widths`` for ``mlp``).
    trust_checkpoint : bool
        Allow unpickling arbitrary Python objects. Only for files from a trusted
        source: unpickling runs code stored in the file.

    Returns
    -------
    nn.Module
        The model, in eval mode, on the CPU.

    Raises
    ------
    FairDeployError
        Missing or corrupt file, a pickled module without ``trust_checkpoint``, or
        weights (a pickled module's too) that do not fit the architecture (the message
        lists the first mismatching, missing and unexpected keys with their shapes).
    """
    path = Path(path)
    obj = _read(path, trust_checkpoint=trust_checkpoint)
    module = _find_module(obj)
    if module is not None:
        _check_finite(dict(module.named_parameters()), path)
        # The recipe's architecture must describe the pickled module (shapes, keys): the
        # run folder's recipe.yaml and model.pt would disagree otherwise.
        expected = _build_uninitialized(arch, num_classes, dict(model_kwargs or {})).state_dict()
        state = _strip_prefixes(module.state_dict(), expected)
        _check_fit(state, expected, path=path, arch=arch, num_classes=num_classes)
        return module.eval()
    state = _find_state_dict(obj, path)
    _check_plain_tensors(state, path)
    model = _build_uninitialized(arch, num_classes, dict(model_kwargs or {}))
    state = _strip_prefixes(state, model.state_dict())
    _factorized_slots(model, state)
    expected = model.state_dict()
    _check_fit(state, expected, path=path, arch=arch, num_classes=num_classes)
    params = {name for name, _ in model.named_parameters()}
    _check_finite({k: v for k, v in state.items() if k in params}, path)
    if any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        try:
            model = model.to_empty(device="cpu")
        except (RuntimeError, MemoryError) as exc:
            raise FairDeployError(
                f"model.arch {arch!r} does not fit in memory ({type(exc).__name__}: "
                f"{first_line(exc)})"
            ) from None
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:  # e.g. a dtype the parameter cannot take
        raise FairDeployError(
            f"checkpoint {path} does not load into model.arch {arch!r} ({first_line(exc)})"
        ) from None
    return model.eval()


def _check_plain_tensors(state: Mapping[str, Any], path: Path) -> None:
    """Refuse tensors a dense float model cannot take as they are: sparse or quantized
    layouts, meta tensors (no data), complex numbers."""
    for key, t in state.items():
        if not torch.is_tensor(t):
            continue
        problem = None
        if t.layout != torch.strided:
            problem = f"is a sparse tensor ({t.layout}): save it dense (t.to_dense())"
        elif t.is_quantized:
            problem = f"is quantized ({t.dtype}): save the float weights (t.dequantize())"
        elif t.is_meta:
            problem = "has no data (a meta tensor): save the materialised weights"
        elif t.is_complex():
            problem = f"holds complex numbers ({t.dtype}): a classifier's weights are real"
        if problem:
            raise FairDeployError(f"checkpoint {path}: {key!r} {problem}")


def _check_finite(tensors: Mapping[str, Any], path: Path) -> None:
    """Refuse parameters holding NaN or infinity: every number computed from them would be
    meaningless (training diverged, or the file is damaged)."""
    for key, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not t.is_meta:
            bad = int((~torch.isfinite(t)).sum())
            if bad:
                raise FairDeployError(
                    f"checkpoint {path}: parameter {key!r} holds {non_finite(bad)}: training "
                    "diverged or the file is damaged; give a checkpoint with finite weights"
                )


def _build_uninitialized(arch: str, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    """The architecture without its random initialisation, which the checkpoint overwrites
    anyway (1.9 s for vgg11_paper): built on the meta device, materialised by the caller.

    Falls back to an ordinary build when the factory fails on the meta device or the model
    has non-persistent buffers (they are not in a state dict, so they need their init).
    """
    try:
        with torch.device("meta"):
            model = build_model(arch, num_classes, **kwargs)
    except FairDeployError:
        # A custom factory that computes on real tensors fails on the meta device: build
        # it for real (a factory that fails there too raises the error to show).
        return build_model(arch, num_classes, **kwargs)
    if any(m._non_persistent_buffers_set for m in model.modules()):
        return build_model(arch, num_classes, **kwargs)
    return model


def save_checkpoint(
    model: nn.Module,
    path: str | os.PathLike[str],
    *,
    extra: Mapping[str, Any] | None = None,
) -> Path:
    """Save a model's weights as a plain dict, atomically.

    The file holds ``{"state_dict": ..., "metadata": {"format", "version",
    "torch_version", **extra}}`` and loads with ``torch.load(weights_only=True)``
    and :func:`load_checkpoint`.

    Parameters
    ----------
    model : nn.Module
        The model whose ``state_dict`` is saved (tensors are copied to the CPU).
    path : path-like
        Destination; written to a temporary name in the same folder, then renamed.
    extra : mapping, optional
        Metadata to store (e.g. ``arch``, ``num_classes``, ``epoch``): only ``str``,
        ``int``, ``float``, ``bool``, ``None`` and lists/tuples/dicts of them, so the
        file stays loadable without unpickling code.

    Returns
    -------
    Path
        The path written.
    """
    metadata: dict[str, Any] = {
        "format": _FORMAT, "version": 1, "torch_version": str(torch.__version__)
    }
    for key, value in (extra or {}).items():
        check_plain_value(value, f"save_checkpoint extra[{key!r}]")
        metadata[str(key)] = value
    # Module extra state (e.g. FactorizedLinear's sparsity record) is a plain dict.
    state: dict[str, Any] = {}
    for k, v in model.state_dict().items():
        if torch.is_tensor(v):
            state[k] = v.detach().cpu().clone()
        else:
            check_plain_value(v, f"save_checkpoint state_dict[{k!r}]")
            state[k] = v
    path = Path(path)
    atomic_torch_save({"state_dict": state, "metadata": metadata}, path)
    return path


def checkpoint_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The ``metadata`` dict of a checkpoint (empty if it has none); loads safely."""
    obj = _read(Path(path), trust_checkpoint=False)
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    return dict(meta) if isinstance(meta, dict) else {}


# --------------------------------------------------------------------------- helpers


def _read(path: Path, *, trust_checkpoint: bool) -> Any:
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "no such file"
        raise FairDeployError(f"checkpoint {path}: {what}")
    kind = _torch_file_kind(path)
    if kind is None:
        raise FairDeployError(
            f"checkpoint {path} is not a PyTorch checkpoint or is damaged (neither a torch.save "
            "zip archive nor a legacy torch pickle): give a file written by torch.save"
        )
    if kind == "zip":
        _check_archive(path)
    else:
        warnings.warn(
            f"checkpoint {path} is in torch's legacy (pre-1.6) format, which carries no "
            "checksums: damage to its tensor bytes cannot be detected. Re-save it with "
            "torch.save(torch.load(path), path) to get a checked archive",
            UserWarning,
            stacklevel=3,
        )
    try:
        return _torch_load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        if not str(exc).startswith("Weights only load failed"):
            raise _corrupt(path, exc) from None
        if not _names_importable_globals(str(exc)):
            # The weights-only unpickler reports damaged bytes as "unsupported" opcodes or
            # globals with garbled names: that is damage, not a pickled module.
            raise _corrupt(path, _unpickler_reason(exc)) from None
        if not trust_checkpoint:
            raise FairDeployError(
                f"checkpoint {path} holds pickled Python objects (e.g. a whole nn.Module), not "
                "only tensors: unpickling it runs arbitrary code from the file. Re-save it as a "
                "state dict (torch.save(model.state_dict(), path)), or pass --trust-checkpoint "
                "if you trust where it came from"
            ) from None
    except Exception as exc:  # torch raises RuntimeError, KeyError, EOFError... on bad bytes
        raise _corrupt(path, exc) from None
    try:
        return _torch_load(path, weights_only=False)
    except Exception as exc:
        raise FairDeployError(
            f"checkpoint {path} cannot be unpickled even with --trust-checkpoint "
            f"({type(exc).__name__}: {first_line(exc)}); the code that defined its classes "
            "must be importable"
        ) from None


def _torch_load(path: Path, *, weights_only: bool) -> Any:
    with warnings.catch_warnings():
        # torch warns about sparse-tensor invariants and legacy storages; the checks
        # below say what matters, once.
        warnings.simplefilter("ignore", UserWarning)
        return torch.load(path, map_location="cpu", weights_only=weights_only)


def _check_archive(path: Path) -> None:
    """Every record of a torch.save zip archive must match its CRC-32.

    ``torch.load`` does not check them, so bytes flipped inside a tensor record would
    load as different weights without a word.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            bad = zf.testzip()
    # zipfile raises RuntimeError for a member flagged as encrypted (one flipped bit).
    except (zipfile.BadZipFile, OSError, EOFError, ValueError, NotImplementedError,
            RuntimeError) as exc:
        raise _corrupt(
            path, f"a truncated or broken zip archive, {type(exc).__name__}: {first_line(exc)}"
        ) from None
    if bad is not None:
        raise FairDeployError(
            f"checkpoint {path} is damaged: its record {bad!r} does not match the CRC-32 "
            "stored in the archive (the file was altered or corrupted after torch.save wrote "
            "it): restore it from a good copy"
        )


_GLOBAL_RE = re.compile(r"Unsupported global: GLOBAL ([^\s]+)")


def _names_importable_globals(message: str) -> bool:
    """Whether a weights-only failure names a real Python global (a pickled object) rather
    than garbage decoded from damaged bytes. Only finds the top-level package: nothing is
    imported or run."""
    m = _GLOBAL_RE.search(message)
    if m is None:
        return False
    name = m.group(1)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+", name):
        return False
    try:
        return importlib.util.find_spec(name.split(".", 1)[0]) is not None
    except (ImportError, ValueError):
        return False


def _unpickler_reason(exc: BaseException) -> str:
    text = str(exc)
    i = text.find("WeightsUnpickler error:")
    detail = text[i + len("WeightsUnpickler error:") :].strip().splitlines() if i >= 0 else []
    return detail[0][:200] if detail else "invalid pickle data"


# torch.save's legacy (non-zip) format starts with a pickled magic number.
_LEGACY_MAGIC = b"\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


def _torch_file_kind(path: Path) -> str | None:
    """``"zip"``, ``"legacy"`` or None. Checked up front: the weights-only unpickler
    reports random bytes as "unsupported globals", which would wrongly read as a
    pickled module."""
    with path.open("rb") as fh:
        head = fh.read(32)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if _LEGACY_MAGIC in head:
        return "legacy"
    if zipfile.is_zipfile(path):  # a zip with a prefix (self-extracting, padded)
        return "zip"
    return None


def _corrupt(path: Path, exc: BaseException | str) -> FairDeployError:
    reason = exc if isinstance(exc, str) else f"{type(exc).__name__}: {first_line(exc)}"
    return FairDeployError(
        f"checkpoint {path} is not a PyTorch checkpoint or is damaged ({reason}): give a file "
        "written by torch.save, or restore it from a good copy"
    )


def _find_module(obj: Any) -> nn.Module | None:
    if isinstance(obj, nn.Module):
        return obj
    if isinstance(obj, dict):
        for key in _WRAPPER_KEYS:
            if isinstance(obj.get(key), nn.Module):
                return obj[key]
    return None


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) for k in obj)
        # Module extra state (e.g. a FactorizedLinear's sparsity record) is a plain dict.
        and all(torch.is_tensor(v) or k.endswith("._extra_state") for k, v in obj.items())
        and any(torch.is_tensor(v) for v in obj.values())
    )


def _find_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if _is_state_dict(inner):
                return dict(inner)
        keys = ", ".join(map(repr, list(obj)[:8]))
        raise FairDeployError(
            f"checkpoint {path} is a dict without a state dict (keys: {keys}): expected tensors "
            f"by parameter name, or a dict holding them under one of {', '.join(_WRAPPER_KEYS)}"
        )
    raise FairDeployError(
        f"checkpoint {path} holds a {type(obj).__name__}, not a state dict: save "
        "model.state_dict() with torch.save"
    )


def _factorized_slots(model: nn.Module, state: Mapping[str, Any]) -> None:
    """Swap in a FactorizedLinear wherever a processed checkpoint (``optimize``'s
    model.pt) stores ``<layer>.U/.S/.V`` for an ``nn.Linear`` of the architecture, so its
    weights load with the usual shape checks."""
    from fairdeploy.lrf import FactorizedLinear

    for key in state:
        if not key.endswith(".U"):
            continue
        name = key[:-2]
        if not all(f"{name}.{p}" in state for p in ("S", "V")):
            continue
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            continue
        if not isinstance(linear, nn.Linear):
            continue
        U, S, V = state[f"{name}.U"], state[f"{name}.S"], state[f"{name}.V"]
        layer = FactorizedLinear(
            torch.zeros(U.shape), torch.zeros(S.shape), torch.zeros(V.shape), linear.bias
        )
        for buf in ("sparse_rows", "sparse_cols"):
            if f"{name}.{buf}" in state:
                setattr(layer, buf, torch.zeros_like(state[f"{name}.{buf}"]))
        model.set_submodule(name, layer)


def _strip_prefixes(
    state: dict[str, torch.Tensor], expected: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix) :]: v for k, v in state.items()}
    if state and not set(state) & set(expected):
        # Wrappers such as Lightning's store "model.<name>": drop a shared first
        # component when that makes the keys match.
        heads = {k.split(".", 1)[0] for k in state}
        if len(heads) == 1 and all("." in k for k in state):
            stripped = {k.split(".", 1)[1]: v for k, v in state.items()}
            if set(stripped) & set(expected):
                state = stripped
    return state


def _check_fit(
    state: Mapping[str, torch.Tensor],
    expected: Mapping[str, torch.Tensor],
    *,
    path: Path,
    arch: str,
    num_classes: int,
) -> None:
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        (k, tuple(expected[k].shape), tuple(state[k].shape))
        for k in expected
        if k in state
        and torch.is_tensor(expected[k])
        and tuple(expected[k].shape) != tuple(getattr(state[k], "shape", ()))
    ]
    dtypes = [
        (k, expected[k].dtype, state[k].dtype)
        for k in expected
        if k in state
        and torch.is_tensor(expected[k])
        and torch.is_tensor(state[k])
        and expected[k].is_floating_point()
        and not state[k].is_floating_point()
    ]
    if dtypes:
        k, e, f = dtypes[0]
        raise FairDeployError(
            f"checkpoint {path}: {k!r} is stored as {f}, the model's parameter is {e}: integer "
            "weights would be cast silently; save the float weights"
        )
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        listed = "; ".join(
            f"{k}: model {_fmt(e)}, checkpoint {_fmt(f)}" for k, e, f in shapes[:_SHOW]
        )
        parts.append(f"{len(shapes)} shape mismatch{'es' if len(shapes) > 1 else ''} ({listed}")
        parts[-1] += ", ...)" if len(shapes) > _SHOW else ")"
    for label, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            listed = ", ".join(keys[:_SHOW]) + (", ..." if len(keys) > _SHOW else "")
            parts.append(f"{len(keys)} {label} key{'s' if len(keys) > 1 else ''} ({listed})")
    hint = "check model.arch, model.num_classes and model.kwargs"
    last = list(expected)[-2:]  # the head's weight and bias
    head = [f for k, _, f in shapes if k in last and f]
    if head and all(h[0] != num_classes for h in head) and len({h[0] for h in head}) == 1:
        hint = f"the checkpoint's head has {head[0][0]} outputs: is model.num_classes {head[0][0]}?"
    raise FairDeployError(
        f"checkpoint {path} does not fit model.arch {arch!r} with num_classes={num_classes}: "
        + "; ".join(parts)
        + f" — {hint}"
    )


def _fmt(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(map(str, shape)) + ("," if len(shape) == 1 else "") + ")"


def check_plain_value(value: Any, where: str) -> None:
    """Raise FairDeployError unless ``value`` is what ``torch.load(weights_only=True)``
    reads without unpickling code: str, int, float, bool, None, lists/dicts of them."""
    # Exact types: numpy scalars and enums subclass float/int but need unpickling.
    if value is None or type(value) in (str, int, float, bool):
        return
    if type(value) in (list, tuple):
        for i, v in enumerate(value):
            check_plain_value(v, f"{where}[{i}]")
        return
    if type(value) is dict:
        for k, v in value.items():
            if not isinstance(k, str):
                raise FairDeployError(f"{where}: key {k!r} is not a string")
            check_plain_value(v, f"{where}[{k!r}]")
        return
    raise FairDeployError(
        f"{where}: {type(value).__name__} is not allowed (use str, int, float, bool, None, "
        "or lists/dicts of them, so the file loads with weights_only=True)"
    )
