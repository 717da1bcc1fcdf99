"""What the commands share: run names, output paths, the experiment, warnings as notes.

Used by every module of :mod:`fairdeploy.commands`; imports none of them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from fairdeploy.cache import CacheWarning
from fairdeploy.errors import FairDeployError
from fairdeploy.experiment import Experiment
from fairdeploy.methods import get_method
from fairdeploy.plan import Plan
from fairdeploy.recipe import Recipe, recipe_hash
from fairdeploy.rundir import check_out

__all__ = [
    "DEFAULT_EXPORTS",
    "run_name_stem",
    "warnings_as_notes",
]


DEFAULT_EXPORTS = Path("exports")


Echo = Callable[[str], None]


def _template_names() -> dict[str, Path]:
    """``name:`` of every recipe shipped in the package → its file."""
    import yaml

    names: dict[str, Path] = {}
    for path in sorted((Path(__file__).parent.parent / "recipes").glob("*.yaml")):
        try:
            name = (yaml.safe_load(path.read_text(encoding="utf-8")) or {}).get("name")
        except (OSError, yaml.YAMLError, AttributeError):
            continue
        if isinstance(name, str):
            names[name] = path.resolve()
    return names


def run_name_stem(recipe_path: Path | None, recipe: Recipe) -> str:
    """The first part of a run folder's name: the recipe's ``name:``, or the recipe file's
    name when there is none or when it is still the name of the shipped template it was
    copied from (every copy of image_csv.yaml would otherwise be ``my-images``)."""
    name = recipe.name
    if recipe_path is not None:
        template = _template_names().get(name or "")
        if not name or (template is not None and template != Path(recipe_path).resolve()):
            name = Path(recipe_path).stem
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name or "recipe")


def _run_name(recipe_path: Path, recipe: Recipe, what: str, checkpoint_sha256: str) -> str:
    """``<recipe>-<method>-<hash>``; the hash covers the recipe and the checkpoint's content,
    so two checkpoints optimized with one recipe get two folders."""
    stem = run_name_stem(recipe_path, recipe)
    digest = hashlib.sha256(f"{recipe_hash(recipe)}:{checkpoint_sha256}".encode()).hexdigest()
    what = re.sub(r"[^A-Za-z0-9_.-]+", "-", what)
    return f"{stem}-{what}-{digest[:8]}"


def check_creatable(path: Path) -> None:
    """Refuse, without creating anything, a folder that could not be created or written:
    its nearest existing ancestor must be a folder we may write into. (A refused command
    leaves no empty folder behind; the folder is made when the first file is written.)"""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise FairDeployError(
            f"cannot create the folder {str(path)!r}: {str(existing)!r} is a file"
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise FairDeployError(
            f"cannot write into the folder {str(path)!r} (permission denied)"
            if existing == path else
            f"cannot create the folder {str(path)!r}: no permission to write into "
            f"{str(existing)!r}"
        )


def _paths(
    recipe_path: str | Path, exports_dir: str | Path, cache_dir: Any, out: str | Path | None,
    *, check: Callable[[Path], Any] = check_out,
) -> tuple[Path, Path, Path | None]:
    """Normalise a command's paths and check (``check``), before any work, that its output
    can be written: ``cache_dir="default"`` means ``<exports>/.cache``."""
    exports_dir = Path(exports_dir)
    if out is not None:
        check(Path(out))
    else:
        check_creatable(exports_dir)
    if cache_dir == "default":
        cache_dir = exports_dir / ".cache"
    return Path(recipe_path), exports_dir, None if cache_dir is None else Path(cache_dir)


def _experiment(
    recipe: Recipe,
    checkpoint: str | Path,
    *,
    cache_dir: Path | None,
    device: str,
    progress: bool,
    trust_checkpoint: bool,
) -> Experiment:
    from fairdeploy.runtimes import load_runtime_check

    for runtime in recipe.export.verify_runtimes:  # refused before any work, in one line
        load_runtime_check(runtime)
    return Experiment(
        recipe,
        checkpoint,
        cache_dir=cache_dir,
        device=device,
        progress=progress,
        trust_checkpoint=trust_checkpoint,
    )


def _runnable(plan: Plan, what: str) -> None:
    reason = plan.implementation.unavailable
    if reason:
        from fairdeploy.methods import list_methods

        ready = [n for n in list_methods() if not get_method(n).unavailable]
        raise FairDeployError(
            f"{what}: {plan.method!r} cannot run: {reason} (use one of {', '.join(ready)})"
        )


_QUIET_CATEGORIES = (DeprecationWarning, FutureWarning, PendingDeprecationWarning)
# The package's own folder (this module sits one below it): warnings raised from there are ours.
_PACKAGE_DIR = str(Path(__file__).resolve().parent.parent)


#: Warning categories a method's own (static) warning can stand for, and the word in it.
_COVERED_BY = {"FactorizationWarning": "break-even", "HessianApproximationWarning":
               "HessianApproximationWarning"}


@contextlib.contextmanager
def warnings_as_notes(
    covered: Sequence[str] = (), *, run_notes: list[str] | None = None
) -> Iterator[list[str]]:
    """Collect the warnings fairdeploy raises inside the block as report notes.

    The list yielded is filled when the block ends: one sentence per distinct warning
    raised from fairdeploy's own code (an approximate Hessian, a cache file recomputed,
    a layer stored larger than dense), instead of ``file.py:line: Warning`` text on
    stderr. A ``FactorizationWarning`` or ``HessianApproximationWarning`` is left out
    when one of the ``covered`` texts (the method's own warnings: rank above break-even,
    modules after the layer that are not piecewise linear) already says it: those stand
    next to the numbers also when the factors or Hessians come from the cache and
    nothing warns. Deprecation notices of the libraries are dropped; any other library
    warning is shown as usual. A :class:`~fairdeploy.cache.CacheWarning` (a cached value
    recomputed) concerns the run, not a method: it goes to ``run_notes`` when given.
    """
    notes: list[str] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield notes
    for w in caught:
        ours = str(Path(w.filename).resolve()).startswith(_PACKAGE_DIR) or (
            w.category.__module__.startswith("fairdeploy")
        )
        if ours:
            word = _COVERED_BY.get(w.category.__name__)
            if word is not None and any(word in text for text in covered):
                continue
            text = str(w.message).strip()
            target = (
                run_notes if run_notes is not None and issubclass(w.category, CacheWarning)
                else notes
            )
            if text not in target:
                target.append(text)
        elif not issubclass(w.category, _QUIET_CATEGORIES) and "TracerWarning" not in (
            w.category.__name__
        ):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def _seed(plan: Plan) -> int:
    spec = getattr(plan, "scoring", None)
    return int(spec.seed) if spec is not None else 0
