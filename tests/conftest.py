"""Test set-up shared by every test module.

Eight fake CPU devices let multi-device tests run on one machine. The flag must be set before
JAX initialises its backends, so it is set here, before any test module imports jax.
"""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
