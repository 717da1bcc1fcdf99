"""Only the CLI layer may import click (the library stays usable without it)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fairdeploy

PKG = Path(fairdeploy.__file__).parent


def _imports_click(path: Path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if any(n.split(".")[0] == "click" for n in names):
            return True
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "click":
            return True
    return False


def test_only_cli_imports_click():
    offenders = sorted(
        str(p.relative_to(PKG)) for p in PKG.rglob("*.py") if _imports_click(p)
    )
    assert offenders == ["cli.py"]


def test_library_modules_load_without_click():
    code = (
        "import sys, fairdeploy, fairdeploy.export, fairdeploy.verification, fairdeploy.bench, "
        "fairdeploy.providers; print('click' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_cli_group_has_the_commands():
    from fairdeploy.cli import main

    assert {"verify", "bench"} <= set(main.commands)


def test_public_api_names_resolve() -> None:
    import fairdeploy

    for name in fairdeploy.__all__:
        assert getattr(fairdeploy, name) is not None, name
