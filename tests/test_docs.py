"""The docs site covers the product: every command has prose, every public API name an API entry.

The command reference itself is generated from the CLI (docs/reference/cli.md), so it cannot miss a command; these
tests catch what generation cannot: a new command nobody explained, a public function left off the API page, a page
missing from the site's navigation.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import yaml

from transferkit.cli.reference import command

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def documented_members() -> dict[str, set[str]]:
    """`::: module` blocks of the API page and the members each lists (None: the whole module)."""
    text = (DOCS / "reference" / "api.md").read_text()
    blocks = re.findall(r"^::: ([\w.]+)\n((?:    .*\n)*)", text, flags=re.M)
    found: dict[str, set[str]] = {}
    for module, options in blocks:
        members = re.search(r"members: \[(.*)\]", options)
        found[module] = {m.strip() for m in members.group(1).split(",")} if members else {"*"}
    return found


def test_the_reference_module_registers_every_command() -> None:
    names = set(command.commands)
    assert {"train", "evaluate", "predict", "export", "serve", "auto", "doctor", "pack", "fetch"} <= names


def test_every_command_is_explained_in_a_guide_or_tutorial() -> None:
    prose = "\n".join(page.read_text() for page in DOCS.rglob("*.md") if page.parent.name != "reference")
    unexplained = [name for name in command.commands if f"transferkit {name}" not in prose]
    assert not unexplained, f"commands without a guide section: {unexplained}"


def test_every_public_api_name_is_on_the_api_page() -> None:
    documented = documented_members()
    missing = []
    for module in ("transferkit.auto", "transferkit.doctor", "transferkit.fetch", "transferkit.report",
                   "transferkit.serve"):
        public = {name for name in importlib.import_module(module).__all__ if not name.isupper()}
        missing += [f"{module}.{name}" for name in public - documented.get(module, set())]
    missing += [f"transferkit.api.{name}" for name in ("train", "resume", "load")
                if name not in documented.get("transferkit.api", set())]
    assert not missing, f"public names missing from docs/reference/api.md: {missing}"


def test_every_page_is_in_the_navigation() -> None:
    config = (ROOT / "mkdocs.yml").read_text()
    # Only the nav is read: the file's other tags (python handlers) need no constructor here.
    nav = yaml.safe_load(config[config.index("\nnav:"):])["nav"]

    def pages(entries) -> set[str]:
        out: set[str] = set()
        for entry in entries:
            value = next(iter(entry.values())) if isinstance(entry, dict) else entry
            out |= pages(value) if isinstance(value, list) else {value}
        return out

    on_disk = {str(page.relative_to(DOCS)) for page in DOCS.rglob("*.md")}
    assert on_disk == pages(nav)


def test_the_design_page_lists_the_checked_layer_order() -> None:
    """docs/design.md's layer table is .importlinter's contract, row for row (the contract is what lint enforces)."""
    config = (ROOT / ".importlinter").read_text()
    block = config.split("layers =\n", 1)[1].split("#", 1)[0].split("ignore_imports", 1)[0]
    contract = [sorted(m.strip().removeprefix("transferkit.") for m in row.split("|")) for row in block.splitlines()
                if row.strip()]
    table = re.findall(r"^\| [^|`]+ \| (`[^|]*`(?: · `[^|]*`)*) \|", (DOCS / "design.md").read_text(), flags=re.M)
    assert [sorted(re.findall(r"`(\w+)`", row)) for row in table] == contract


def slug(heading: str) -> str:
    """A heading's anchor as GitHub and mkdocs' toc both make it for plain headings (words, spaces, hyphens)."""
    return re.sub(r"\s+", "-", re.sub(r"[^\w\s-]", "", heading.strip().lower()))


def test_readme_links_reach_existing_pages_and_headings() -> None:
    """README is read on GitHub, outside the strict mkdocs build: its links are checked here."""
    broken = []
    for target in re.findall(r"\]\(([^)#]+)(#[^)]*)?\)", (ROOT / "README.md").read_text()):
        path, anchor = ROOT / target[0], target[1].lstrip("#")
        if target[0].startswith("http"):
            continue
        if not path.exists():
            broken.append(target[0])
        elif anchor and anchor not in {slug(h) for h in re.findall(r"^#+ (.*)$", path.read_text(), flags=re.M)}:
            broken.append(f"{target[0]}#{anchor}")
    assert not broken, f"README links to nothing: {broken}"
