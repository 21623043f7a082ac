"""Suite-wide settings. Kept import-light: unit tests must not start Ray."""

import os

# Triton kernels are compiled for real only on CUDA; on CPU the suite runs them
# under Triton's interpreter. The flag is read when a kernel is decorated, so it
# must be set before any ``moefleet.kernels`` module is imported.
os.environ.setdefault("TRITON_INTERPRET", "1")
# Every Ray the suite starts binds to loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
# Every fleet the suite starts serves its telemetry endpoint on a free port, never the default 8470.
os.environ.setdefault("MOEFLEET_HTTP_PORT", "0")
