"""Unit tests need nothing running: fail any that starts Ray."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray_in_unit_tests():
    import ray

    was_running = ray.is_initialized()  # a session-wide Ray of the integration tests
    yield
    if not was_running and ray.is_initialized():
        ray.shutdown()
        pytest.fail("unit tests must not start Ray; move the test to tests/integration/")
