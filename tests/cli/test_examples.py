"""The example automation files of docs/AUTOMATIONS.md (docs/examples/) and
packaging/examples/ pass `trigd check`, run as a user runs it, so they cannot rot."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

EXAMPLES = sorted(
    path
    for folder in (REPO / "docs" / "examples", REPO / "packaging" / "examples")
    for path in folder.iterdir()
    if path.suffix in (".yaml", ".yml", ".json")
)
TRIGD = Path(sys.executable).parent / "trigd"


def test_there_are_examples_of_every_trigger_type() -> None:
    names = {path.name for path in EXAMPLES}
    assert {
        "heartbeat.yaml",
        "burst.yaml",
        "sequence.yaml",
        "compound.json",
        "prefect-flow-runs.yaml",
        "example.yaml",
    } <= names


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_trigd_check_accepts_the_example(example: Path) -> None:
    result = subprocess.run(
        [str(TRIGD), "check", str(example.relative_to(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (result.returncode, result.stderr) == (0, ""), result.stderr
    *summaries, pointer = result.stdout.splitlines()
    assert pointer == "reference: docs/AUTOMATIONS.md"
    assert summaries, result.stdout
    assert all(line.startswith(f"{example.relative_to(REPO)}: ") for line in summaries)
    assert all("no automations" not in line for line in summaries)


def test_the_docs_show_every_example() -> None:
    """docs/AUTOMATIONS.md links each example file it is the reference for."""
    text = (REPO / "docs" / "AUTOMATIONS.md").read_text()
    for example in EXAMPLES:
        if example.parent.name == "examples" and example.parent.parent.name == "docs":
            assert f"examples/{example.name}" in text, example.name


def _anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces as hyphens."""
    headings = re.findall(r"^#+ (.+)$", page.read_text(), flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_the_links_of_the_reference_lead_somewhere() -> None:
    docs = REPO / "docs"
    text = (docs / "AUTOMATIONS.md").read_text()
    links = re.findall(r"\]\(([^)\s]+)\)", text)
    assert links
    for link in links:
        target, _, anchor = link.partition("#")
        page = docs / target if target else docs / "AUTOMATIONS.md"
        assert page.exists(), link
        if anchor:
            assert anchor in _anchors(page), link
