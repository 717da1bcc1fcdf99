"""The fairdeploy metadata of an ONNX file (JSON values under ``fairdeploy.`` keys) and
the atomic write of a model: what the float export, the packed rebuild and the int8 export
share."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import onnx

from fairdeploy._io import publish
from fairdeploy._json import METADATA_PREFIX, decode_prefixed
from fairdeploy.errors import FairDeployError
from fairdeploy.export._sizes import _load_header

__all__ = [
    "DOCUMENTED_KEYS",
    "METADATA_PREFIX",
    "SINGLE_FILE_LIMIT",
    "encode_metadata",
    "metadata_of",
    "read_metadata",
    "save_atomic",
    "set_metadata",
    "update_metadata",
]

#: Keys the pipeline fills (documented in the README); any other key is stored as given.
DOCUMENTED_KEYS = (
    "producer",
    "version",
    "recipe_hash",
    "method",
    "plan",
    "class_names",
    "group_names",
    "preprocessing",
    "theoretical_cr",
    "measured_cr",
    "fairness",
    "layers",
    "sparse_layout",
    "deployed",
)
#: A single .onnx file holds at most 2 GB (protobuf limit); beyond, weights go to .onnx.data.
SINGLE_FILE_LIMIT = 1_900_000_000


def encode_metadata(metadata: Mapping[str, Any]) -> dict[str, str]:
    """``metadata`` as ``metadata_props`` entries: keys prefixed with ``fairdeploy.``,
    values as JSON; a FairDeployError for an empty key or a value JSON cannot hold."""
    out: dict[str, str] = {}
    for key, value in metadata.items():
        if not isinstance(key, str) or not key:
            raise FairDeployError(f"metadata key {key!r} is not allowed: use a non-empty string")
        full = key if key.startswith(METADATA_PREFIX) else METADATA_PREFIX + key
        try:
            out[full] = json.dumps(value, sort_keys=True)
        except (TypeError, ValueError) as exc:
            raise FairDeployError(
                f"metadata[{key!r}] cannot be stored as JSON ({exc}): use str, numbers, "
                "lists and dicts"
            ) from None
    return out


def set_metadata(model: onnx.ModelProto, encoded: Mapping[str, str]) -> None:
    """Add or replace ``encoded`` entries (from :func:`encode_metadata`) in ``model``'s
    ``metadata_props``, kept sorted by key."""
    props = {p.key: p.value for p in model.metadata_props}
    props.update(encoded)
    del model.metadata_props[:]
    for key in sorted(props):
        model.metadata_props.add(key=key, value=props[key])


def read_metadata(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The fairdeploy metadata of an ONNX model, JSON-decoded, keys without the prefix.

    Keys (DESIGN.md §5): ``producer``, ``version``, ``recipe_hash``, ``method``, ``plan``
    (per-layer k/sr/rr/β), ``class_names``, ``group_names``, ``preprocessing`` (size, crop,
    mean, std), ``theoretical_cr``, ``measured_cr``, ``fairness``, ``layers`` (the export
    layout, written by :func:`export_onnx`).
    """
    return metadata_of(_load_header(path), path)


def metadata_of(model: onnx.ModelProto, path: str | os.PathLike[str]) -> dict[str, Any]:
    """:func:`read_metadata` of a model already loaded from ``path``."""
    try:
        props = [(p.key, p.value) for p in model.metadata_props]
    except UnicodeDecodeError:
        props = [(b"", b"")]
    # Protobuf strings must be UTF-8; damaged ones come back as bytes (or fail to decode).
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in props):
        raise FairDeployError(
            f"ONNX model {str(path)!r} has damaged metadata (not UTF-8): re-export it with "
            "fairdeploy optimize"
        )
    out = decode_prefixed(props, METADATA_PREFIX)
    _check_metadata_types(out, path)
    return out


def _check_metadata_types(meta: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Known keys must have the types fairdeploy writes: a damaged or hand-edited entry is
    a user-facing error, not a crash in whatever reads it."""

    def names(v: Any) -> bool:
        return isinstance(v, list) and all(isinstance(x, str) for x in v)

    checks = {
        "layers": lambda v: isinstance(v, list)
        and all(isinstance(r, dict) and isinstance(r.get("layer"), str) for r in v),
        "class_names": names,
        "group_names": names,
        "privileged": lambda v: v is None or isinstance(v, str),
        "preprocessing": lambda v: isinstance(v, dict),
        **dict.fromkeys(
            ("plan", "fairness", "measured_cr", "deployed", "baseline", "int8"),
            lambda v: isinstance(v, dict),
        ),
        **dict.fromkeys(
            ("method", "producer", "version", "recipe_hash", "checkpoint_sha256",
             "sparse_layout"),
            lambda v: isinstance(v, str),
        ),
        "theoretical_cr": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    }
    bad = [k for k, ok in checks.items() if k in meta and not ok(meta[k])]
    if bad:
        raise FairDeployError(
            f"ONNX model {str(path)!r} has damaged fairdeploy metadata ({', '.join(bad)}): "
            "re-export it with fairdeploy optimize"
        )


def update_metadata(path: str | os.PathLike[str], metadata: Mapping[str, Any]) -> None:
    """Add or replace metadata entries of an existing model (e.g. the measured C.R., known
    only once the vanilla model is exported too). The file is rewritten atomically."""
    _load_header(path)  # user-facing error for a missing or corrupt file
    model = onnx.load(str(path))
    set_metadata(model, encode_metadata(metadata))
    save_atomic(model, Path(path))


def save_atomic(model: onnx.ModelProto, path: Path, *, size: int | None = None) -> None:
    """Write ``model`` to a temporary name in the target folder, then rename.

    One file when the weights fit (under 2 GB); otherwise weights go to
    ``<name>.onnx.data``, written and renamed before the model that references it.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    size = model.ByteSize() if size is None else size  # known to the caller: saves a pass
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".fairdeploy-") as tmp:
        tmp_model = Path(tmp) / path.name
        if size < SINGLE_FILE_LIMIT:
            onnx.save_model(model, str(tmp_model))
            publish(tmp_model, path)
            stale = path.with_name(path.name + ".data")
            if stale.exists():
                stale.unlink()
        else:
            data_name = path.name + ".data"
            onnx.save_model(
                model,
                str(tmp_model),
                save_as_external_data=True,
                all_tensors_to_one_file=True,
                location=data_name,
                size_threshold=1024,
            )
            publish(Path(tmp) / data_name, path.parent / data_name)
            publish(tmp_model, path)
