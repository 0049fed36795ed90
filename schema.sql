-- trigd schema, version 5 (store/db.py SCHEMA_VERSION).
--
-- Applied whole by store/db.py inside one transaction when PRAGMA user_version is 0; an
-- older database climbs user_version one step at a time (store/db.py MIGRATIONS). All times are
-- INTEGER microseconds since the Unix epoch, UTC (suffix _us), so comparisons are exact.
-- UUIDs are lowercase hyphenated TEXT. JSON documents are TEXT.

-- Small process-wide facts that must survive restarts (the events clock, ...).
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) WITHOUT ROWID;

-- Every accepted event, for retention, status and re-evaluation of parked followers.
-- A rowid table: rows are large (the JSON), so they are appended in arrival order and only
-- the small id index takes a random insert (an id-keyed table split a page every few rows).
CREATE TABLE events (
    id          TEXT NOT NULL UNIQUE,
    event       TEXT NOT NULL,
    resource_id TEXT NOT NULL,
    occurred_us INTEGER NOT NULL,
    received_us INTEGER NOT NULL,
    follows     TEXT,
    data        TEXT NOT NULL          -- ReceivedEvent JSON
);
CREATE INDEX events_received ON events (received_us);
-- Events out and events queries read an `occurred` window newest (or oldest) first.
CREATE INDEX events_occurred ON events (occurred_us);

-- Events trigd made itself (automation state changes, action results) wait here, durably,
-- to be evaluated by the next batch like any received event.
CREATE TABLE inbox (
    seq   INTEGER PRIMARY KEY,
    event TEXT NOT NULL                -- ReceivedEvent JSON
);

-- Causal ordering (docs/ORDERING.md), one namespace per scope. Seen ids expire by time only.
-- "Processing" marks are not stored: they live only as long as the call frame that
-- processes the event (daemon/engine/ordering.py), so none can be left stale by a crash.
CREATE TABLE ordering_seen (
    scope   TEXT NOT NULL,
    id      TEXT NOT NULL,
    seen_us INTEGER NOT NULL,
    PRIMARY KEY (scope, id)
) WITHOUT ROWID;
CREATE INDEX ordering_seen_expiry ON ordering_seen (scope, seen_us);

-- Keyed by leader first: every processed event asks for its followers, and a key prefix
-- is a plan SQLite cannot get wrong without statistics (a secondary index lost to a scan
-- of the whole scope). A follower is parked at most once per scope.
CREATE TABLE ordering_followers (
    scope       TEXT NOT NULL,
    leader_id   TEXT NOT NULL,
    follower_id TEXT NOT NULL,
    received_us INTEGER NOT NULL,
    occurred_us INTEGER NOT NULL,
    event       TEXT NOT NULL,         -- ReceivedEvent JSON of the parked follower
    PRIMARY KEY (scope, leader_id, follower_id),
    UNIQUE (scope, follower_id)
) WITHOUT ROWID;
CREATE INDEX ordering_followers_received ON ordering_followers (scope, received_us);

-- The automations last loaded, and a fingerprint per trigger so that a changed trigger
-- starts fresh while an unchanged one keeps its buckets across reloads and restarts.
CREATE TABLE automations (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    enabled    INTEGER NOT NULL,
    definition TEXT NOT NULL,          -- Automation JSON
    loaded_us  INTEGER NOT NULL
) WITHOUT ROWID;

CREATE TABLE triggers (
    id            TEXT PRIMARY KEY,
    automation_id TEXT NOT NULL,
    fingerprint   TEXT NOT NULL
) WITHOUT ROWID;

-- Trigger state (docs/TRIGGERS.md#buckets): one row per (trigger, bucketing key).
-- A rowid table for the same reason as events: last_event makes rows large, and keys
-- arrive in random order; new rows are appended and only the key index is random (keyed
-- by (trigger_id, bucketing_key) WITHOUT ROWID, the rows themselves split pages: measured
-- 3.1 instead of 1.3 pages written per event).
-- Only a proactive pass reads buckets by window end or count, so only a Proactive
-- trigger's rows are in buckets_due and buckets_met: the reactive rows (nearly all) spare
-- a second random index write per insert or moved window (about a third of the pages a
-- flood writes at commit). A pass looks up the windows that are over (buckets_due) and
-- those that counted an event (buckets_met: a heartbeat's restarted window counts 0, so
-- it is not there), never every open bucket.
-- `proactive` is the trigger's posture; a posture change is a new fingerprint, so a
-- trigger's rows never disagree about it.
CREATE TABLE buckets (
    trigger_id     TEXT NOT NULL,
    bucketing_key  TEXT NOT NULL,      -- JSON array of strings
    automation_id  TEXT NOT NULL,
    proactive      INTEGER NOT NULL,   -- 1 for a Proactive trigger's bucket, else 0
    start_us       INTEGER NOT NULL,
    end_us         INTEGER NOT NULL,
    count          INTEGER NOT NULL,   -- may be -1
    last_event     TEXT,               -- ReceivedEvent JSON or NULL
    last_operation TEXT,
    UNIQUE (trigger_id, bucketing_key)
);
CREATE INDEX buckets_due ON buckets (trigger_id, end_us) WHERE proactive;
CREATE INDEX buckets_met ON buckets (trigger_id, count) WHERE proactive AND count > 0;
CREATE INDEX buckets_end ON buckets (end_us);

-- Composite triggers (docs/TRIGGERS.md#composite-triggers): the latest firing of each direct
-- child, at its event time. Keyed like Prefect's unique index, automation first, so ids repeated
-- across files cannot collide.
CREATE TABLE composite_child_firings (
    automation_id     TEXT NOT NULL,
    parent_trigger_id TEXT NOT NULL,
    child_trigger_id  TEXT NOT NULL,
    child_firing_id   TEXT NOT NULL,
    child_fired_us    INTEGER NOT NULL, -- event time of the child firing
    child_firing      TEXT NOT NULL,    -- Firing JSON
    PRIMARY KEY (automation_id, parent_trigger_id, child_trigger_id)
) WITHOUT ROWID;

-- The outbox: one row per triggered action, written in the firing's transaction
-- (daemon/core/delivery.py has the state table). The max_age window and the backoff schedule
-- start at coalesce(revived_us, created_us); `attempts` counts attempts in that window,
-- delivery_attempts keeps them all.
CREATE TABLE outbox (
    id            TEXT PRIMARY KEY,    -- TriggeredAction.id, also the webhook-id
    automation_id TEXT NOT NULL,
    action_index  INTEGER NOT NULL,
    action_type   TEXT NOT NULL,
    endpoint      TEXT,                -- scheme://host:port of a webhook, for fairness
    status        TEXT NOT NULL CHECK (status IN ('pending', 'in_flight', 'delivered', 'dead', 'cancelled')),
    document      TEXT NOT NULL,       -- TriggeredAction JSON
    created_us    INTEGER NOT NULL,
    next_attempt_us INTEGER NOT NULL,
    lease_until_us  INTEGER,           -- set while in_flight; past it the row is reclaimed
    attempts      INTEGER NOT NULL DEFAULT 0,
    last_error    TEXT,
    finished_us   INTEGER,             -- when it became delivered, dead or cancelled
    revived_us    INTEGER              -- last `trigd outbox retry`
) WITHOUT ROWID;
CREATE INDEX outbox_due ON outbox (status, next_attempt_us);
CREATE INDEX outbox_endpoint_due ON outbox (status, endpoint, next_attempt_us);
CREATE INDEX outbox_finished ON outbox (finished_us);

-- Every attempt to deliver an outbox row: when, how long, and what came of it.
CREATE TABLE delivery_attempts (
    id           INTEGER PRIMARY KEY,
    outbox_id    TEXT NOT NULL,
    attempted_us INTEGER NOT NULL,
    latency_us   INTEGER,              -- NULL when the attempt never finished (lease expired)
    status_code  INTEGER,              -- NULL on a network error or timeout
    error        TEXT
);
CREATE INDEX delivery_attempts_outbox ON delivery_attempts (outbox_id, attempted_us);
