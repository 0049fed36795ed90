"""The service's start-up pieces that need no running daemon (the whole daemon is in
tests/e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest

from daemon.core.config import StoreConfig
from daemon.runtime.service import open_store
from store.db import WRITER_CACHE_KIB


@pytest.mark.parametrize(("mib", "kib"), [(None, WRITER_CACHE_KIB), (3, 3 * 1024)])
def test_the_writer_gets_the_configured_page_cache(
    tmp_path: Path, mib: int | None, kib: int
) -> None:
    settings = StoreConfig(path=tmp_path / "t.db")
    if mib is not None:
        settings = settings.model_copy(update={"page_cache_mib": mib})
    store = open_store(settings)
    try:
        assert store.conn.execute("PRAGMA cache_size").fetchone() == (-kib,)
    finally:
        store.close()
