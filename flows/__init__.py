"""Prefect flows: pipeline.py (one run of the DVC stages), benchmark.py (a grid of runs)."""

import os

# Quiet, offline-friendly defaults, set before Prefect is imported; any of them can be
# overridden from the environment.
for key, value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "PREFECT_LOGGING_SERVER_LEVEL": "WARNING",
    "DVC_NO_ANALYTICS": "1",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}.items():
    os.environ.setdefault(key, value)
