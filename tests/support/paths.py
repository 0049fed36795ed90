"""Where things are in the repository, for tests that read its files or run its code: a test
module sits one or two levels under tests/, so it names paths from here, not from its own
`__file__`."""

from __future__ import annotations

from pathlib import Path
from typing import Final

REPO: Final = Path(__file__).resolve().parent.parent.parent
"""The repository's root: pyproject.toml, daemon/, store/, packaging/, tests/."""

TESTS: Final = REPO / "tests"
SUPPORT: Final = TESTS / "support"
