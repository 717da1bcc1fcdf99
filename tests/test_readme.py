"""The README is a user's guide that stays true: short, no development history, a module
map that names every module of the package, links that resolve, and the test command CI runs.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PKG = ROOT / "fairdeploy"
MAX_LINES = 400
TEST_COMMAND = (
    'pip install torch==2.14.1 torchvision==0.29.1 && pip install -e ".[dev]" && '
    "ruff check . && python -m pytest"
)
#: How development history reads; the README speaks of the code as it is (CHANGELOG.md holds
#: how it got there).
ROUND_LANGUAGE = [
    r"\brounds?\b",
    r"\bstops? \d+",
    r"\bturns? \d+",
    r"\bthis session\b",
    r"\bissue \d+",
    r"\b(?:first|second|third|last|previous|next) (?:round|stop|turn|session)\b",
]


def _text() -> str:
    return README.read_text(encoding="utf-8")


def _section(text: str, heading: str) -> str:
    """The lines under ``## heading`` up to the next ``## `` heading."""
    match = re.search(rf"^## {re.escape(heading)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {heading}' section"
    return match.group(1)


def _map_rows(text: str) -> dict[str, str]:
    """Module map rows: each name in a row's first cell -> the whole row."""
    rows: dict[str, str] = {}
    for line in _section(text, "Module map").splitlines():
        cells = line.split("|")
        first = cells[1].strip() if len(cells) >= 3 else ""
        if not first or set(first) <= {"-"} or first == "module":
            continue
        for name in re.findall(r"`([^`]+)`", cells[1]):
            rows[name] = line
    return rows


def _package_modules() -> dict[str, list[str]]:
    """Top-level entries of fairdeploy/ (``x.py`` or ``pkg/``) -> the modules inside a package."""
    entries: dict[str, list[str]] = {}
    for path in sorted(PKG.iterdir()):
        if path.suffix == ".py" and path.name not in {"__init__.py", "__main__.py"}:
            entries[path.name] = []
        elif path.is_dir() and (path / "__init__.py").exists():
            entries[f"{path.name}/"] = sorted(
                str(p.relative_to(path).with_suffix(""))
                for p in path.rglob("*.py")
                if p.name != "__init__.py" and "__pycache__" not in p.parts
            )
    return entries


def test_readme_is_at_most_400_lines():
    lines = _text().splitlines()
    assert len(lines) <= MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {MAX_LINES}): move details to docs/"
    )


def test_readme_speaks_of_the_code_not_of_development_rounds():
    text = _text()
    found = [
        (n + 1, m.group(0))
        for n, line in enumerate(text.splitlines())
        for pattern in ROUND_LANGUAGE
        for m in re.finditer(pattern, line, re.I)
    ]
    assert found == [], f"development-round language in README.md (line, words): {found}"


@pytest.mark.parametrize(
    "line",
    [
        "Earlier, on the shared machine (best of two rounds): 0.72×",
        "Steps: 4.42× at stop 13, 3.73× with shared traces",
        "## fairdeploy beside them (read from the code, turn 3)",
        "measured in this session on the H200",
        "one test per cause found in issue 11",
    ],
)
def test_round_language_patterns_catch_history(line):
    assert any(re.search(p, line, re.I) for p in ROUND_LANGUAGE)


def test_every_module_of_the_package_is_in_the_module_map():
    rows = _map_rows(_text())
    missing = [name for name in _package_modules() if name not in rows]
    assert missing == [], f"add a row to the README's module map for: {missing}"
    unnamed = {
        package: [m for m in modules if f"`{m}`" not in rows[package]]
        for package, modules in _package_modules().items()
        if modules
    }
    unnamed = {k: v for k, v in unnamed.items() if v}
    assert unnamed == {}, f"name these modules in their package's map row: {unnamed}"


def test_the_module_map_names_only_what_exists():
    stale = [name for name in _map_rows(_text()) if not (PKG / name.rstrip("/")).exists()]
    assert stale == [], f"the README's module map names what fairdeploy/ does not hold: {stale}"


def _relative_links(path: Path) -> list[str]:
    links = re.findall(r"\]\(([^)\s]+)\)", path.read_text(encoding="utf-8"))
    return [link for link in links if not re.match(r"[a-z]+:", link)]


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize(
    "page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name
)
def test_links_in_the_readme_and_docs_resolve(page):
    broken = []
    for link in _relative_links(page):
        target, _, anchor = link.partition("#")
        file = (page.parent / target).resolve() if target else page
        if not file.exists():
            broken.append(link)
        elif anchor and file.suffix == ".md":
            headings = re.findall(r"^#+ (.+)$", file.read_text(encoding="utf-8"), re.M)
            if anchor not in {_anchor(h) for h in headings}:
                broken.append(link)
    assert broken == [], f"{page.name}: links to nothing: {broken}"


def test_readme_test_command_is_what_ci_runs():
    assert f"```\n{TEST_COMMAND}\n```" in _text()
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    for step in ("torch==2.14.1 torchvision==0.29.1", '-e ".[dev]"', "ruff check .", "pytest"):
        assert step in ci
