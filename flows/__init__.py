"""Prefect flows. Importing this package sets safe defaults for Prefect's temporary server
before Prefect is imported: a longer cold-start timeout (it takes 15-25 s on 2 cores) and no
analytics (which would try to reach the internet)."""

import os

os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
