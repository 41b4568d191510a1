import pytest


@pytest.fixture(scope="session")
def prefect_server():
    """One real Prefect server (temporary, SQLite) for every flow test; yields its API URL."""
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield PREFECT_API_URL.value()
