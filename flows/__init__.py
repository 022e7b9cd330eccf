"""Prefect orchestration of medseg: the ``segment-study`` flow and its ``nightly`` deployment.

The flows only orchestrate: every imaging step is a medseg function (discover, load,
Predictor.predict, export_mask, evaluate_case, write_reports) that the CLI and the tests
call too.

Importing this package turns Prefect's telemetry off unless the user has chosen
otherwise: medseg runs on hospital networks, where nothing should phone home and an
offline server's telemetry attempts only log errors. It also makes a flow run called
from Python send its heartbeat every 30 s (Prefect's default is 180 s), so the crash
automation of a server that also runs the nightly deployment (flows/health.py, 90 s by
default) never takes it for a dead run. These are defaults for Prefect's own settings
(set before Prefect is imported, which is when Prefect reads them); an explicit value
in the environment wins.
"""

from __future__ import annotations

import os

PRIVATE_DEFAULTS = {
    "DO_NOT_TRACK": "1",  # client-side SDK telemetry
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # a temporary server started for an in-process run
    # A temporary server takes 10-30 s to start on a small machine; Prefect's 20 s default is too tight.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30",  # Prefect's minimum; see medseg_flows.health for why
}

for _key, _value in PRIVATE_DEFAULTS.items():
    os.environ.setdefault(_key, _value)
