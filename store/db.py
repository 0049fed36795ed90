"""Opening the one SQLite file trigd keeps all of its state in.

Theory of operation: the daemon holds exactly one writer connection (WAL mode, explicit
``BEGIN IMMEDIATE`` transactions via ``with store.conn:``) and an exclusive lock file beside
the database so that a second ``trigd serve`` refuses to start. Readers such as
``trigd status`` open their own read-only connection and never take the lock. A new
database gets ``schema.sql`` (the current version) whole; an older one climbs ``PRAGMA
user_version`` one step at a time, each step in its own transaction. A database newer
than this code is refused.

The database holds secrets (webhook secrets and headers in the automations and the outbox),
so its files are readable by their owner only, whatever the umask: the main file is
created 0600 before SQLite opens it (SQLite gives -wal and -shm the main file's mode), and
one left group- or world-readable by an older trigd is tightened when opened. A disk that
is full or failing while the store opens is ``StoreUnavailable``, which start-up waits
out, rather than a path that cannot work.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import importlib.resources
import logging
import os
import stat
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import apsw
import apsw.bestpractice
import attrs

from store.connection import Connection

if TYPE_CHECKING:  # an annotation only: opening the store does not load the configuration
    from daemon.core.config import Synchronous

SCHEMA_VERSION: Final = 5
BUSY_TIMEOUT_MS: Final = 5_000
WRITER_CACHE_KIB: Final = 2_048  # KiB of page cache for the writer ([store] page_cache_mib)
"""Big enough for the hot pages (index tails, open buckets) of a busy database: at 100,000
events and as many open buckets the default cache missed about once per event."""
WAL_AUTOCHECKPOINT_PAGES: Final = 4_000  # WAL frames before a COMMIT checkpoints (default 1,000)
"""A flood rewrites the same random index pages commit after commit: checkpointing every
4,000 frames (a WAL of about 16 MiB) copies each such page once instead of once per two
commits. Measured with bench_engine's workload: COMMIT 11.7 -> 9.4 CPU µs/event in batches
of 500, longest COMMIT 26 -> 34 ms; one event per commit unchanged (longest 9 -> 6 ms)."""
IN_CHUNK: Final = 500  # ids per IN (...) clause, well under SQLite's bound-parameter limit

FILE_MODE: Final = 0o600
"""The mode of the database, its -wal and -shm: they hold secrets."""
DB_SUFFIXES: Final = ("", "-wal", "-shm")

TRANSIENT_ERRNOS: Final = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EIO})
"""OS errors of the disk, not of the path: freeing space or replacing a cable fixes them."""

log = logging.getLogger(__name__)


class StoreError(Exception):
    """A problem with the database that an operator has to fix; the message says how."""


class StoreUnavailable(StoreError):
    """The disk under the database is full or failing right now (``TRANSIENT_ERRNOS``):
    a retry once it clears may work."""


class DatabaseTooNew(StoreError):
    pass


class DatabaseInUse(StoreError):
    pass


class UnusableDatabase(StoreError):
    """The path cannot hold a database: a directory, a file that is not SQLite, a place
    where the file or its lock cannot be created. Another path is the fix, not a retry."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path}: {why}")
        self.path = path
        self.why = why


def _schema_sql() -> str:
    """schema.sql ships in the wheel as store/schema.sql; a checkout has it at the root."""
    packaged = importlib.resources.files("store").joinpath("schema.sql")
    if packaged.is_file():
        return packaged.read_text(encoding="utf-8")
    return (Path(__file__).resolve().parent.parent / "schema.sql").read_text(encoding="utf-8")


_V2_PROACTIVE_BUCKETS: Final = """
ALTER TABLE buckets ADD COLUMN proactive INTEGER NOT NULL DEFAULT 0;
UPDATE buckets SET proactive = 1;
DROP INDEX buckets_start;
CREATE INDEX buckets_start ON buckets (trigger_id, start_us, bucketing_key) WHERE proactive;
"""
"""Version 1 indexed every bucket by start; version 2 only a Proactive trigger's. Which
trigger is Proactive is not in the database, so every existing row is marked as if it
were: a proactive pass still finds all of its buckets, and a reactive row leaves the
index the next time it is written (each write sets the trigger's real posture)."""

_V3_CANCELLED_DELIVERIES: Final = """
CREATE TABLE outbox_v3 (
    id            TEXT PRIMARY KEY,
    automation_id TEXT NOT NULL,
    action_index  INTEGER NOT NULL,
    action_type   TEXT NOT NULL,
    endpoint      TEXT,
    status        TEXT NOT NULL
        CHECK (status IN ('pending', 'in_flight', 'delivered', 'dead', 'cancelled')),
    document      TEXT NOT NULL,
    created_us    INTEGER NOT NULL,
    next_attempt_us INTEGER NOT NULL,
    lease_until_us  INTEGER,
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    finished_us   INTEGER,
    revived_us    INTEGER
) WITHOUT ROWID;
INSERT INTO outbox_v3 SELECT id, automation_id, action_index, action_type, endpoint, status,
    document, created_us, next_attempt_us, lease_until_us, attempts, last_error, finished_us,
    revived_us FROM outbox;
DROP TABLE outbox;
ALTER TABLE outbox_v3 RENAME TO outbox;
CREATE INDEX outbox_due ON outbox (status, next_attempt_us);
CREATE INDEX outbox_endpoint_due ON outbox (status, endpoint, next_attempt_us);
CREATE INDEX outbox_finished ON outbox (finished_us);
"""
"""Version 3 adds the `cancelled` status (`trigd outbox cancel`). SQLite cannot change a
CHECK in place, so the outbox table is rebuilt, its rows and indexes as they were."""

_V4_EVENTS_BY_OCCURRED: Final = """
CREATE INDEX events_occurred ON events (occurred_us);
"""
"""Version 4 indexes events by when they occurred: an events-out subscriber's backfill and
an events query read them newest (or oldest) first within an `occurred` window."""

_V5_DUE_BUCKETS: Final = """
DROP INDEX buckets_start;
CREATE INDEX buckets_due ON buckets (trigger_id, end_us) WHERE proactive;
CREATE INDEX buckets_met ON buckets (trigger_id, count) WHERE proactive AND count > 0;
"""
"""Version 5: a proactive pass reads only the windows that are over (`buckets_due`, by
end) and those that already counted an event (`buckets_met`), instead of paging through
every open bucket in start order (`buckets_start`, dropped)."""

# A new database gets schema.sql (the current version) in one step; an older one climbs
# one step per version: MIGRATIONS[N] takes it from N-1 to N.
MIGRATIONS: Final[Mapping[int, str]] = MappingProxyType(
    {
        2: _V2_PROACTIVE_BUCKETS,
        3: _V3_CANCELLED_DELIVERIES,
        4: _V4_EVENTS_BY_OCCURRED,
        5: _V5_DUE_BUCKETS,
    }
)

_best_practice_applied = False


class _CheckpointConnection(apsw.Connection):
    """A connection for checkpoints only (``open_checkpointer``): it gets none of
    apsw.bestpractice's set-up, whose ``PRAGMA optimize`` at open may take the write lock
    from under the writer, or fail as busy because of it."""


def _apply_best_practice() -> None:
    """apsw.bestpractice's recommended settings for every connection but a checkpointer's
    (as ``apsw.bestpractice.apply`` does, with that exception)."""
    global _best_practice_applied
    if _best_practice_applied:
        return
    practices = apsw.bestpractice.recommended
    per_connection = [f for f in practices if f.__name__.startswith("connection_")]
    for practice in practices:
        if practice not in per_connection:
            practice()

    def apply(connection: apsw.Connection) -> None:
        if not isinstance(connection, _CheckpointConnection):
            for practice in per_connection:
                practice(connection)

    apsw.connection_hooks.append(apply)
    _best_practice_applied = True


def in_chunks(ids: Sequence[str]) -> Iterator[tuple[Sequence[str], str]]:
    """Slices of `ids` small enough for one `IN (...)`, each with its `?,?,...` marks."""
    for start in range(0, len(ids), IN_CHUNK):
        chunk = ids[start : start + IN_CHUNK]
        yield chunk, ",".join("?" * len(chunk))


@contextlib.contextmanager
def write_transaction(conn: apsw.Connection) -> Iterator[apsw.Connection]:
    """One top-level ``BEGIN IMMEDIATE`` transaction: committed when the block ends,
    rolled back when it raises or when the COMMIT itself fails.

    The same as ``with conn:``, except for the GIL. apsw keeps it through the COMMIT of its
    context manager, fsync included, while ``execute("COMMIT")`` lets it go. The daemon's
    trio thread (reading and parsing frames, sending acks) then runs during the fsync
    instead of waiting it out (docs/PERFORMANCE.md), which matters most where fsync is
    slow (SD cards, eMMC). Blocks inside may use ``with conn:``, which becomes a
    savepoint; this one may not be nested.
    """
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:  # a failed COMMIT may have rolled back already
            conn.execute("ROLLBACK")
        raise


def user_version(conn: apsw.Connection) -> int:
    row = conn.execute("PRAGMA user_version").fetchone()
    assert row is not None
    return int(row[0])


def migrate(conn: apsw.Connection, path: str) -> None:
    """Bring the schema up to SCHEMA_VERSION, refusing a database written by newer code."""
    current = user_version(conn)
    if current > SCHEMA_VERSION:
        raise DatabaseTooNew(
            f"{path}: database schema version {current} is newer than this trigd "
            f"understands ({SCHEMA_VERSION}); upgrade trigd or use another database file"
        )
    if current == 0:
        with conn:
            conn.execute(_schema_sql())
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION:d}")
        return
    for version in range(current + 1, SCHEMA_VERSION + 1):
        with conn:
            conn.execute(MIGRATIONS[version])
            conn.execute(f"PRAGMA user_version = {version:d}")


@attrs.define
class WalCheckpoints:
    """Who checkpoints the writer's WAL, decided after each COMMIT by its size in frames.

    Why: SQLite's autocheckpoint copies the WAL into the database file inside the COMMIT
    that crosses its threshold: that commit, and every acknowledgement waiting on it,
    takes milliseconds longer about once a second in a trickle. So the daemon replaces it
    with this hook. Past ``request_at`` frames it calls ``request``: the daemon's
    checkpointer runs a PASSIVE checkpoint on a connection of its own, in another thread,
    while the writer goes on committing, and says when it has copied every frame
    (``caught_up``). A WAL wholly copied starts over from its beginning at the writer's
    next transaction, unless that transaction began before the copy ended (a busy writer):
    then the next COMMIT copies the few frames committed since (the tail) itself, which
    lets the one after start the WAL over. Past ``inline_at`` frames, which only a
    checkpointer that falls behind lets the WAL reach, the writer checkpoints inline as
    SQLite's autocheckpoint would, so the WAL stays bounded whatever happens."""

    request_at: int
    inline_at: int
    request: Callable[[], None]
    caught_up: bool = False  # set by the checkpointer: every frame was copied
    retry_at: int = 0  # a reader kept frames: ask again once the WAL holds this many
    tails: int = 0  # checkpoints of a tail the writer ran
    inline: int = 0  # checkpoints the writer ran because the WAL reached its bound

    def __attrs_post_init__(self) -> None:
        if not 1 <= self.request_at < self.inline_at:
            raise ValueError(
                f"the WAL's checkpoint threshold ({self.request_at}) must be at least 1 and "
                f"below its bound ({self.inline_at})"
            )

    def checkpointed(self, frames: int, copied: int) -> None:
        """What the checkpointer's checkpoint did (``checkpoint``'s answer): all of the
        WAL's ``frames`` copied, the writer may copy the tail; some kept for a reader,
        asking again before the WAL has grown by ``request_at`` would copy nothing."""
        if copied >= frames:
            self.caught_up = True
        else:
            self.retry_at = frames + self.request_at

    def __call__(self, conn: apsw.Connection, dbname: str, pages: int) -> int:
        if pages < self.request_at:
            # the WAL started over, or has not grown yet
            self.caught_up = False
            self.retry_at = 0
        elif self.caught_up or pages >= self.inline_at:
            tail, self.caught_up = self.caught_up, False
            # PASSIVE: waits for nobody. Busy if the checkpointer is at it; a full or
            # failing disk leaves the WAL as it was. The COMMIT has succeeded either way
            # and must not report an error (SQLite's own autocheckpoint ignores them too).
            with contextlib.suppress(apsw.Error):
                conn.wal_checkpoint(dbname)
                if tail:
                    self.tails += 1
                else:
                    self.inline += 1
        elif pages >= self.retry_at:
            self.request()
        return apsw.SQLITE_OK


def checkpoint_in_background(
    conn: apsw.Connection, request_at: int, inline_at: int, request: Callable[[], None]
) -> WalCheckpoints:
    """Take checkpoints off the writer's COMMIT (``WalCheckpoints``): from now on ``conn``
    calls ``request`` past ``request_at`` WAL frames, and checkpoints itself only past
    ``inline_at``. Run it where ``conn`` is used (the store thread)."""
    hook = WalCheckpoints(request_at, inline_at, request)
    conn.set_wal_hook(hook)  # in place of SQLite's autocheckpoint
    return hook


def checkpoint_at_commit(conn: apsw.Connection, pages: int = WAL_AUTOCHECKPOINT_PAGES) -> None:
    """SQLite's autocheckpoint: the COMMIT that takes the WAL past ``pages`` frames
    checkpoints it (a new store's way, and the daemon's again once its checkpointer
    stops)."""
    conn.set_wal_hook(None)
    conn.execute(f"PRAGMA wal_autocheckpoint = {pages:d}")


def open_checkpointer(path: Path) -> apsw.Connection:
    """A second connection to the database, for checkpoints only (it never writes rows):
    a checkpoint on it runs beside the writer's transactions instead of inside them."""
    _apply_best_practice()
    conn = _CheckpointConnection(str(path), flags=apsw.SQLITE_OPEN_READWRITE)
    conn.set_busy_timeout(BUSY_TIMEOUT_MS)
    # reading the header finds the WAL (until then a checkpoint is a no-op answering -1)
    conn.execute("SELECT 1 FROM sqlite_schema LIMIT 1").fetchall()
    return conn


def checkpoint(conn: apsw.Connection) -> tuple[int, int]:
    """A PASSIVE checkpoint (it copies what no reader still needs, waits for nobody):
    frames in the WAL, and how many of them are now in the database file."""
    return conn.wal_checkpoint(mode=apsw.SQLITE_CHECKPOINT_PASSIVE)


@attrs.define
class LockFile:
    """An flock(2) on ``<db>.lock``; the kernel drops it if the process dies, even by SIGKILL.

    The lock sits beside the file the path resolves to, so a symlink or a `..` spelling of
    the path finds the same lock. (Hard links and bind mounts would not; SQLite's own
    documentation counts them among the ways to corrupt a database in WAL mode anyway.)"""

    path: Path
    fd: int

    @classmethod
    def acquire(cls, db_path: Path) -> LockFile:
        real = db_path.resolve()
        lock_path = real.with_name(real.name + ".lock")
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DatabaseInUse(
                f"{db_path} is in use by another trigd (pid {holder}); "
                "only one 'trigd serve' may run on a database"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except OSError:  # a full disk: let the lock go with the fd, or a retry finds it held
            os.close(fd)
            raise
        return cls(lock_path, fd)

    def release(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def os_reason(exc: OSError) -> str:
    """Why an OS call failed, in words: "permission denied" rather than the errno repr."""
    return exc.strerror.lower() if exc.strerror else str(exc)


def _private_files(db_path: Path) -> None:
    """Create the database file 0600 if it is not there (before SQLite does, with 0644
    less the umask), and take group and other access away from the database, -wal and
    -shm files an older trigd or another tool left open to them. A file this process may
    not chmod (someone else's) is left as its owner set it, with a warning."""
    os.close(os.open(db_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE))
    for suffix in DB_SUFFIXES:
        path = db_path.with_name(db_path.name + suffix)
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
            if mode & 0o077:
                os.chmod(path, mode & ~0o077)
                log.warning(
                    "%s was readable by others (mode %04o); now %04o",
                    path,
                    mode,
                    mode & ~0o077,
                )
        except FileNotFoundError:
            continue
        except PermissionError as exc:
            log.warning("%s: cannot make it private to its owner: %s", path, os_reason(exc))


SQLITE_HEADER: Final = b"SQLite format 3\x00"


def _foreign_file(path: Path) -> bool:
    """A file that is there but does not start as a SQLite database does. (SQLite would
    refuse it too, and log an error line of its own besides.)"""
    try:
        with path.open("rb") as handle:
            head = handle.read(len(SQLITE_HEADER))
    except OSError:  # none yet (a new database), or unreadable: SQLite says which
        return False
    return bool(head) and head != SQLITE_HEADER


def _connect(db_path: Path) -> Connection:
    """The writer connection; a path SQLite cannot open or that is not a database is
    UnusableDatabase. (apsw.bestpractice's hooks read the file as the connection opens.)"""
    try:
        return Connection(str(db_path))
    except apsw.NotADBError as exc:
        raise UnusableDatabase(db_path, "not a SQLite database") from exc
    except apsw.CantOpenError as exc:
        raise UnusableDatabase(db_path, f"SQLite cannot open it ({exc})") from exc


@attrs.define
class Store:
    """The writer connection (with its in-memory state, `store.connection`) plus the lock
    that makes it the only writer."""

    path: Path
    conn: Connection
    lock: LockFile | None

    @classmethod
    def open(
        cls,
        path: str | Path,
        *,
        synchronous: Synchronous = "full",
        cache_kib: int = WRITER_CACHE_KIB,
    ) -> Store:
        _apply_best_practice()
        db_path = Path(path)
        if db_path.parent and not db_path.parent.exists():
            raise UnusableDatabase(db_path, f"directory {db_path.parent} does not exist")
        if db_path.is_dir():
            raise UnusableDatabase(db_path, "is a directory, not a database file")
        if _foreign_file(db_path):
            raise UnusableDatabase(db_path, "not a SQLite database")
        try:
            lock = LockFile.acquire(db_path)
        except OSError as exc:  # e.g. a directory that is read-only, or /proc
            why = os_reason(exc)
            if exc.errno in TRANSIENT_ERRNOS:  # writing the pid on a full disk
                raise StoreUnavailable(f"{db_path}: cannot write its lock file: {why}") from exc
            raise UnusableDatabase(db_path, f"cannot create its lock file: {why}") from exc
        try:
            try:
                _private_files(db_path)
            except OSError as exc:
                why = os_reason(exc)
                if exc.errno in TRANSIENT_ERRNOS:
                    raise StoreUnavailable(f"{db_path}: {why}") from exc
                raise UnusableDatabase(db_path, f"cannot open it for writing: {why}") from exc
            conn = _connect(db_path)
            conn.set_busy_timeout(BUSY_TIMEOUT_MS)
            conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
            conn.execute(f"PRAGMA cache_size = -{cache_kib:d}")
            checkpoint_at_commit(conn)
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()
            if mode is None or str(mode[0]).lower() != "wal":
                raise StoreError(f"{db_path}: could not switch the database to WAL mode")
            migrate(conn, str(db_path))
            conn.transaction_mode = "IMMEDIATE"
        except BaseException:
            lock.release()
            raise
        return cls(db_path, conn, lock)

    @classmethod
    def open_readonly(cls, path: str | Path) -> Store:
        """For ``trigd status`` and friends: safe while the daemon runs, never writes."""
        _apply_best_practice()
        db_path = Path(path)
        if not db_path.exists():
            raise StoreError(f"{db_path}: no such database")
        conn = Connection(str(db_path), flags=apsw.SQLITE_OPEN_READONLY)
        conn.set_busy_timeout(BUSY_TIMEOUT_MS)
        version = user_version(conn)
        if version > SCHEMA_VERSION:
            raise DatabaseTooNew(
                f"{db_path}: database schema version {version} is newer than this trigd "
                f"understands ({SCHEMA_VERSION})"
            )
        return cls(db_path, conn, None)

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Connection]:
        """One IMMEDIATE transaction; nested use becomes a savepoint (apsw does this)."""
        with self.conn:
            yield self.conn

    def close(self) -> None:
        self.conn.close()
        if self.lock is not None:
            self.lock.release()
            self.lock = None
