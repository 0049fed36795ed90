"""The database file: schema ladder, WAL, refusal of newer schemas, the single-writer lock."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import apsw
import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from daemon.core.delivery import DeliveryState
from store import outbox
from store.buckets import iter_buckets, read_bucket, write_bucket
from store.db import (
    SCHEMA_VERSION,
    DatabaseInUse,
    DatabaseTooNew,
    Store,
    StoreError,
    UnusableDatabase,
    checkpoint,
    checkpoint_in_background,
    open_checkpointer,
    write_transaction,
)


def test_fresh_database_gets_schema_wal_and_synchronous(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "t.db", synchronous="normal")
    try:
        conn = store.conn
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert conn.execute("PRAGMA synchronous").fetchone() == (1,)  # NORMAL
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_schema")}
        assert {"events", "ordering_followers", "buckets", "outbox", "inbox"} <= tables
    finally:
        store.close()


def test_full_synchronous_is_the_default(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "t.db")
    try:
        assert store.conn.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL
    finally:
        store.close()


def test_reopening_keeps_data_and_does_not_reapply_schema(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = Store.open(path)
    with store.transaction() as conn:
        conn.execute("INSERT INTO meta VALUES ('k', 'v')")
    store.close()
    store = Store.open(path)
    try:
        assert store.conn.execute("SELECT value FROM meta WHERE key='k'").fetchone() == ("v",)
    finally:
        store.close()


def test_transaction_rolls_back_on_error(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "t.db")
    try:

        def failing_batch() -> None:
            with store.transaction() as conn:
                conn.execute("INSERT INTO meta VALUES ('k', 'v')")
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            failing_batch()
        assert store.conn.execute("SELECT count(*) FROM meta").fetchone() == (0,)
    finally:
        store.close()


def test_newer_database_is_refused_with_a_clear_message(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    conn = apsw.Connection(str(path))
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.close()
    with pytest.raises(DatabaseTooNew, match="newer than this trigd understands"):
        Store.open(path)
    with pytest.raises(DatabaseTooNew):
        Store.open_readonly(path)
    # the refused open must not leave the lock held
    conn = apsw.Connection(str(path))
    conn.execute("PRAGMA user_version = 0")
    conn.close()
    Store.open(path).close()


def test_second_writer_in_another_process_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = Store.open(path)
    try:
        probe = (
            "import sys\n"
            "from store.db import Store, DatabaseInUse\n"
            "try:\n"
            f"    Store.open({str(path)!r})\n"
            "except DatabaseInUse as exc:\n"
            "    print(exc); sys.exit(3)\n"
        )
        result = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 3, result.stderr
        assert "in use by another trigd" in result.stdout
        with pytest.raises(DatabaseInUse):
            Store.open(path)
    finally:
        store.close()
    Store.open(path).close()  # released on close


def test_a_symlink_or_dotdot_path_to_a_database_in_use_is_refused(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "t.db"
    store = Store.open(path)
    try:
        (tmp_path / "link.db").symlink_to("t.db")
        (tmp_path / "linked-dir").symlink_to(tmp_path)
        for alias in (
            tmp_path / "link.db",
            tmp_path / "sub" / ".." / "t.db",
            tmp_path / "linked-dir" / "t.db",
        ):
            with pytest.raises(DatabaseInUse, match="in use by another trigd"):
                Store.open(alias)
    finally:
        store.close()
    Store.open(tmp_path / "link.db").close()  # free again once the first writer is gone


def test_readonly_open_works_while_the_writer_holds_the_lock(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    store = Store.open(path)
    try:
        with store.transaction() as conn:
            conn.execute("INSERT INTO meta VALUES ('k', 'v')")
        reader = Store.open_readonly(path)
        try:
            assert reader.conn.execute("SELECT value FROM meta").fetchone() == ("v",)
            with pytest.raises(apsw.ReadOnlyError):
                reader.conn.execute("INSERT INTO meta VALUES ('x', 'y')")
        finally:
            reader.close()
    finally:
        store.close()


def test_missing_directory_and_missing_readonly_file_are_errors(tmp_path: Path) -> None:
    with pytest.raises(StoreError, match="does not exist"):
        Store.open(tmp_path / "nope" / "t.db")
    with pytest.raises(StoreError, match="no such database"):
        Store.open_readonly(tmp_path / "absent.db")


def test_a_path_that_cannot_hold_the_database_is_unusable(tmp_path: Path) -> None:
    """UnusableDatabase (trigd serve: exit 2 naming [store] path), not a bare apsw or OS
    error; and an empty file is a new database, as SQLite has it."""
    (tmp_path / "dir.db").mkdir()
    (tmp_path / "text.db").write_text("name,value\n")
    cases = {
        tmp_path / "dir.db": "is a directory, not a database file",
        tmp_path / "text.db": "not a SQLite database",
        tmp_path / "nope" / "t.db": f"directory {tmp_path / 'nope'} does not exist",
        Path("/proc/trigd.db"): "cannot create its lock file: no such file or directory",
    }
    for path, why in cases.items():
        with pytest.raises(UnusableDatabase) as caught:
            Store.open(path)
        assert (caught.value.path, caught.value.why) == (path, why)
        assert str(caught.value) == f"{path}: {why}"
    (tmp_path / "empty.db").touch()
    Store.open(tmp_path / "empty.db").close()


def _version_1_database(path: Path) -> None:
    """A database as the first release left it (tests/store/schema_v1.sql is its schema.sql)."""
    conn = apsw.Connection(str(path))
    with conn:
        conn.execute((Path(__file__).parent / "schema_v1.sql").read_text(encoding="utf-8"))
        conn.execute("PRAGMA user_version = 1")
        conn.executemany(
            "INSERT INTO buckets (trigger_id, bucketing_key, automation_id, start_us, end_us, "
            "count, last_event, last_operation) VALUES (?, ?, 'a', ?, ?, ?, NULL, '')",
            [("proactive", '["x"]', 1_000, 2_000, 0), ("reactive", '["y"]', 1_500, 2_500, 3)],
        )
    conn.close()


def test_version_1_database_is_migrated_and_keeps_its_buckets(tmp_path: Path) -> None:
    path = tmp_path / "t.db"
    _version_1_database(path)
    store = Store.open(path)
    try:
        conn = store.conn
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        indexes = {str(row[1]) for row in conn.execute("PRAGMA index_list(buckets)")}
        assert {"buckets_due", "buckets_met", "buckets_end"} <= indexes
        assert "buckets_start" not in indexes
        due = conn.execute("SELECT count(*) FROM buckets INDEXED BY buckets_due WHERE proactive")
        assert due.fetchone() == (2,)  # every old row (version 2 marks them all proactive)
        # A proactive pass reads through the partial index: the old row must be in it.
        [proactive] = iter_buckets(conn, "proactive", proactive=True)
        assert (proactive.key, proactive.count) == (("x",), 0)
        reactive = read_bucket(conn, "reactive", ("y",))
        assert reactive is not None
        assert reactive.count == 3
        # The next write of a reactive bucket takes it out of the proactive index.
        with conn:
            write_bucket(conn, "reactive", "a", attrs.evolve(reactive, count=4), proactive=False)
        assert list(iter_buckets(conn, "reactive", proactive=True)) == []
        assert [b.count for b in iter_buckets(conn, "reactive", proactive=False)] == [4]
    finally:
        store.close()
    # Migrated once: reopening changes nothing.
    Store.open(path).close()


def test_an_older_outbox_is_rebuilt_to_take_cancelled_rows_and_keeps_them(
    tmp_path: Path,
) -> None:
    path = tmp_path / "t.db"
    _version_1_database(path)
    conn = apsw.Connection(str(path))
    with conn:
        conn.execute(
            "INSERT INTO outbox (id, automation_id, action_index, action_type, endpoint, status, "
            "document, created_us, next_attempt_us, attempts, last_error) VALUES "
            "('row-1', 'a', 0, 'call-webhook', 'http://h:80', 'pending', '{}', 5, 9, 2, 'HTTP 503')"
        )
        with pytest.raises(apsw.ConstraintError):  # version 1 refuses the new status
            conn.execute("UPDATE outbox SET status = 'cancelled'")
    conn.close()
    store = Store.open(path)
    try:
        row = outbox.get(store.conn, "row-1")
        assert (row.status, row.next_attempt_us, row.attempts, row.last_error) == (
            DeliveryState.PENDING,
            9,
            2,
            "HTTP 503",
        )
        with store.conn:
            outbox.cancel(store.conn, "row-1", 10)
        assert outbox.get(store.conn, "row-1").status is DeliveryState.CANCELLED
        with pytest.raises(apsw.ConstraintError):  # the CHECK is still there
            store.conn.execute("UPDATE outbox SET status = 'lost'")
    finally:
        store.close()


def test_fresh_and_migrated_databases_have_the_same_schema(tmp_path: Path) -> None:
    _version_1_database(tmp_path / "old.db")
    Store.open(tmp_path / "old.db").close()
    Store.open(tmp_path / "new.db").close()

    def layout(path: Path) -> dict[str, list[tuple[object, ...]]]:
        conn = apsw.Connection(str(path))
        try:
            tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_schema")]
            columns = "SELECT name, type, pk FROM pragma_table_info(?)"
            indexes = "SELECT name, partial FROM pragma_index_list(?)"
            return {
                name: sorted(conn.execute(columns, (name,)))
                + sorted(conn.execute(indexes, (name,)))
                for name in tables
            }
        finally:
            conn.close()

    assert layout(tmp_path / "old.db") == layout(tmp_path / "new.db")


def test_write_transaction_commits_rolls_back_and_survives_a_failed_commit(
    tmp_path: Path,
) -> None:
    store = Store.open(tmp_path / "t.db")
    conn = store.conn
    try:
        conn.execute(
            "CREATE TABLE parent (id INTEGER PRIMARY KEY);"
            "CREATE TABLE child (parent_id INTEGER REFERENCES parent (id)"
            " DEFERRABLE INITIALLY DEFERRED)"
        )
        with write_transaction(conn):
            conn.execute("INSERT INTO parent VALUES (1)")
            with conn:  # a savepoint inside
                conn.execute("INSERT INTO child VALUES (1)")
        assert not conn.in_transaction

        def failing_block() -> None:
            with write_transaction(conn):
                conn.execute("INSERT INTO parent VALUES (2)")
                raise RuntimeError("a bug in the block")

        with pytest.raises(RuntimeError):
            failing_block()
        assert not conn.in_transaction

        def failing_commit() -> None:
            with write_transaction(conn):
                conn.execute("INSERT INTO parent VALUES (3)")
                conn.execute("INSERT INTO child VALUES (99)")  # checked at COMMIT

        # the COMMIT fails: the transaction is rolled back rather than left open for the
        # next caller's BEGIN to trip over
        with pytest.raises(apsw.ConstraintError):
            failing_commit()
        assert not conn.in_transaction

        assert conn.execute("SELECT id FROM parent ORDER BY id").fetchall() == [(1,)]
        assert conn.execute("SELECT parent_id FROM child").fetchall() == [(1,)]
    finally:
        store.close()


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def modes(db: Path) -> dict[str, int]:
    """The permission bits of the database's files that exist, by suffix."""
    found = {}
    for suffix in ("", "-wal", "-shm", ".lock"):
        path = db.with_name(db.name + suffix)
        if path.exists():
            found[suffix] = stat.S_IMODE(path.stat().st_mode)
    return found


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o000])
def test_a_new_database_and_its_wal_shm_and_lock_are_private(tmp_path: Path, mask: int) -> None:
    """They hold webhook secrets: 0600 whatever the umask (outside systemd, 022 is usual)."""
    db = tmp_path / "t.db"
    with umask(mask):
        store = Store.open(db)
        try:
            with store.transaction() as conn:
                conn.execute("INSERT INTO meta VALUES ('k', 'v')")
            assert modes(db) == {"": 0o600, "-wal": 0o600, "-shm": 0o600, ".lock": 0o600}
        finally:
            store.close()


def test_a_database_left_readable_by_others_is_made_private_when_opened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    db = tmp_path / "t.db"
    with umask(0o022):
        conn = apsw.Connection(str(db))  # as an older trigd made it: 0644, and its WAL
        conn.execute("PRAGMA journal_mode = WAL")
        conn.execute("CREATE TABLE t (x)")
        assert modes(db)[""] == 0o644
        Path(f"{db}-shm").chmod(0o666)
        store = Store.open(db)
        try:
            assert modes(db) == {"": 0o600, "-wal": 0o600, "-shm": 0o600, ".lock": 0o600}
        finally:
            store.close()
            conn.close()
    assert f"{db} was readable by others (mode 0644); now 0600" in caplog.text
    assert f"{db}-shm was readable by others (mode 0666); now 0600" in caplog.text


# --- WAL checkpoints beside the writer (store.db.WalCheckpoints) ------------------------


def _wal_pages(store: Store) -> int:
    """The most frames the WAL file held since it was created (SQLite does not shrink it)."""
    return os.path.getsize(f"{store.path}-wal") // 4096


def _commit_rows(conn: apsw.Connection, first: int, count: int) -> None:
    for n in range(first, first + count):
        with write_transaction(conn):
            conn.execute("INSERT INTO meta (key, value) VALUES (?, ?)", (f"row {n}", "x" * 6_000))


def test_past_the_threshold_the_writer_asks_and_does_not_checkpoint(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "t.db")
    asked: list[int] = []
    try:
        hook = checkpoint_in_background(store.conn, 64, 100_000, lambda: asked.append(1))
        _commit_rows(store.conn, 0, 300)
        assert _wal_pages(store) > 1_000  # every frame is still in the WAL
        assert len(asked) > 250
        assert hook.inline == hook.tails == 0
    finally:
        store.close()


def test_past_its_bound_the_writer_checkpoints_inline(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "t.db")
    try:
        hook = checkpoint_in_background(store.conn, 64, 200, lambda: None)  # nobody answers
        _commit_rows(store.conn, 0, 300)
        assert _wal_pages(store) < 220  # the bound, and one commit's frames
        assert hook.inline > 5
    finally:
        store.close()


def test_a_checkpoint_beside_the_writer_never_blocks_nor_fails_its_commits(tmp_path: Path) -> None:
    store = Store.open(tmp_path / "t.db")
    try:
        checkpoint_in_background(store.conn, 100_000, 1_000_000, lambda: None)
        _commit_rows(store.conn, 0, 3_000)  # a WAL of some 15,000 frames to copy
        store.conn.set_busy_timeout(0)  # a commit that had to wait would fail at once
        # and each commit's own checkpoint finds the other one at it: busy, not an error
        checkpoint_in_background(store.conn, 64, 100, lambda: None)
        checkpointer = open_checkpointer(store.path)
        result: list[tuple[int, int]] = []
        copying = threading.Thread(target=lambda: result.append(checkpoint(checkpointer)))
        copying.start()
        during = 0
        while copying.is_alive():
            _commit_rows(store.conn, 3_000 + during, 1)
            during += 1
        copying.join()
        frames, copied = result[0]
        assert during > 0
        assert copied == frames > 10_000
        checkpointer.close()
    finally:
        store.close()


@settings(max_examples=20, deadline=None)
@given(
    steps=st.lists(
        st.tuples(st.integers(1, 12), st.booleans()),  # rows of 6 KB in a commit; answered?
        min_size=1,
        max_size=120,
    )
)
def test_whoever_checkpoints_the_wal_stays_under_its_bound(steps: list[tuple[int, bool]]) -> None:
    """Whatever the commits' sizes and whether the checkpointer answers each request or
    not, every COMMIT succeeds and the WAL never holds more than its bound and one
    commit's frames."""
    with tempfile.TemporaryDirectory() as directory:
        store = Store.open(Path(directory) / "t.db")
        checkpointer = open_checkpointer(store.path)
        asked: list[bool] = []
        try:
            hook = checkpoint_in_background(store.conn, 40, 120, lambda: asked.append(True))
            largest, n = 0, 0
            for rows, answered in steps:
                asked.clear()
                _commit_rows(store.conn, n, rows)
                n += rows
                largest = max(largest, rows * 3)  # a 6 KB row: two overflow pages and a leaf
                if asked and answered:
                    hook.checkpointed(*checkpoint(checkpointer))
            assert _wal_pages(store) <= 120 + largest + 10  # the bound, a commit, b-tree pages
            count = store.conn.execute("SELECT count(*) FROM meta WHERE key LIKE 'row %'")
            assert count.fetchone() == (n,)
        finally:
            checkpointer.close()
            store.close()


def test_while_a_reader_keeps_frames_the_writer_asks_again_only_as_the_wal_grows(
    tmp_path: Path,
) -> None:
    """A checkpoint that had to leave frames for a reader's snapshot is asked for again
    once the WAL has grown by the threshold, not at every commit: asking sooner would copy
    nothing."""
    store = Store.open(tmp_path / "t.db")
    checkpointer = open_checkpointer(store.path)
    reader = apsw.Connection(str(store.path), flags=apsw.SQLITE_OPEN_READONLY)
    asked: list[bool] = []
    try:
        _commit_rows(store.conn, 0, 30)  # something for the reader to read
        reader.execute("BEGIN")
        reader.execute("SELECT count(*) FROM meta").fetchall()  # a snapshot to keep
        hook = checkpoint_in_background(store.conn, 64, 100_000, lambda: asked.append(True))
        requests = 0
        for n in range(30, 330):  # a few frames each: some 1,500 in all
            asked.clear()
            _commit_rows(store.conn, n, 1)
            if asked:
                requests += 1
                hook.checkpointed(*checkpoint(checkpointer))
        assert 5 < requests < 40  # about one per 64 frames, not one per commit (300)
        assert hook.caught_up is False
        reader.execute("COMMIT")
    finally:
        reader.close()
        checkpointer.close()
        store.close()
