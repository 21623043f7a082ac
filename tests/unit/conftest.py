"""Unit tests need nothing running: fail any that starts Ray."""

import pytest


@pytest.fixture(autouse=True)
def _no_ray_in_unit_tests():
    yield
    try:
        import ray
    except ImportError:  # pragma: no cover
        return
    if ray.is_initialized():
        ray.shutdown()
        pytest.fail("unit tests must not start Ray; move the test to tests/integration/")
