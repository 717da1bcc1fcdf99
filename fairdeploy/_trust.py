"""Whether a recipe may import code: ``package.module:name`` strings outside fairdeploy.

A recipe's method (``pkg.mod:Class``), architecture (``pkg.mod:factory``), its
``compare:`` entries, ``sweep --method`` and a recipe given to ``verify --recipe`` can
name code to import, and importing a module runs its top-level code. A recipe is data
that may come from anyone, so such an import happens only when the user says the recipe
is trusted: the ``--trust-recipe`` flag (:func:`trusting_recipes` around the command) or
the environment variable ``FAIRDEPLOY_TRUST_RECIPE=1``. Otherwise the import string is
refused in one line, before anything is imported (``--dry-run`` included). Modules of
the ``fairdeploy`` package itself need no opt-in.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

from fairdeploy.errors import FairDeployError

__all__ = ["TRUST_ENV", "check_import_allowed", "recipes_trusted", "trusting_recipes"]

#: The environment variable that trusts every recipe of the process (value ``1``).
TRUST_ENV = "FAIRDEPLOY_TRUST_RECIPE"

_TRUSTED = [False]


def recipes_trusted() -> bool:
    """Whether import strings outside fairdeploy may be imported now."""
    return _TRUSTED[0] or os.environ.get(TRUST_ENV, "").strip() == "1"


@contextlib.contextmanager
def trusting_recipes(trusted: bool = True) -> Iterator[None]:
    """Within the block, recipes may (``trusted``) or may not import code of their own
    (what ``--trust-recipe`` sets for one command); the environment variable still
    trusts them."""
    before = _TRUSTED[0]
    _TRUSTED[0] = bool(trusted)
    try:
        yield
    finally:
        _TRUSTED[0] = before


def check_import_allowed(spec: str, what: str) -> None:
    """Refuse the import string ``spec`` (``package.module:name``) unless its module is
    fairdeploy's own or recipes are trusted; nothing is imported here.

    Parameters
    ----------
    spec : str
        The import string as written.
    what : str
        Where it was written, for the message (``method``, ``model.arch``).
    """
    module = spec.partition(":")[0].strip()
    if module.split(".", 1)[0] == "fairdeploy" or recipes_trusted():
        return
    raise FairDeployError(
        f"{what} {spec!r} would import and run {module!r}, code from outside fairdeploy: "
        f"a recipe runs no code of its own unless you trust it; pass --trust-recipe (or set "
        f"{TRUST_ENV}=1) if you trust {module!r} and the recipe"
    )
