"""Test support code: what more than one test module needs, and nothing that pytest collects.

- `daemon_process`: the real daemon as a subprocess (config and automation files, start, stop).
- `webhook_receiver`: a real HTTP receiver on 127.0.0.1, triggered actions, a jumping clock.
- `sender_harness`: a sender started on a real store, delivering to that receiver.
- `engine_harness`: the real engine on a real SQLite file, in the scenario tests' notation.
- `composite_scenarios`: the automations and events of the composite-trigger scenarios.
- `evaluator_doubles`: a frozen clock, a gated engine, the ids a database holds.
- `ingest_client`: ingest and the evaluator in-process, and websocket clients for them.
- `resending_client`: a client that resends what was not confirmed, as Prefect's does.
- `strategies`: hypothesis strategies for events and automations.
- `samples`: sample documents (an automations file).
- `paths`: the repository's root (`REPO`), for tests that read its files or run its code.
- `prefect_client_script.py`: run by path with Prefect's virtualenv, never imported.

The rule: test modules import from `tests.support`, never from each other (`tests.test_*`,
`tests.<dir>.test_*`); `tests/test_imports.py` enforces it. Fixtures shared across modules
live in `tests/conftest.py`. The layout of tests/: docs/ARCHITECTURE.md#tests.
"""
