"""A real Prefect `@flow`, run against the Prefect server of PREFECT_API_URL. Not a test
module: tests/e2e/test_upstream.py runs it with the Python of the Prefect virtualenv
(tests/support/prefect_venv.py) and reads the one JSON object it prints, the flow run's id.
"""

from __future__ import annotations

import json

from prefect import flow  # type: ignore[import-not-found, unused-ignore]
from prefect.runtime import flow_run  # type: ignore[import-not-found, unused-ignore]


@flow(name="edge-nightly-check")  # type: ignore[untyped-decorator, unused-ignore]
def nightly_check() -> str:
    return str(flow_run.id)


if __name__ == "__main__":
    print(json.dumps({"flow_run_id": nightly_check()}))
