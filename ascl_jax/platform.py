"""Per-platform defaults of the XLA compiler, set before JAX starts its backend.

XLA reads `XLA_FLAGS` once, when JAX creates its first backend, so `apply_platform_defaults` has
to run before any JAX computation or `jax.devices()` call: the entry points call it before they
import the library. It only adds flags of XLA's CPU compiler (`--xla_cpu_*`), which leave the
GPU and TPU compilers alone, and it adds none when `JAX_PLATFORMS` selects another platform
first. A flag that the user already put in `XLA_FLAGS` keeps the user's value.

The defaults must not change results: `tests/test_bench_train.py` checks that two train steps
with and without them give the same loss and parameters to float32 tolerance.
"""

import logging
import os
import sys
from collections.abc import MutableMapping

logger = logging.getLogger(__name__)

# Flags of XLA's CPU compiler for jaxlib 0.10.2, checked with `experiments.bench_train` on a
# 2-core x86-64 CPU with AVX-512 (ResNet-18, batch 64). No flag tried there made the step
# measurably faster: --xla_cpu_use_onednn=true was within the run-to-run noise.
# NOTE: XLA aborts on a flag it does not know, so a jaxlib that drops one of these needs the
# list updated.
CPU_XLA_FLAGS: tuple[str, ...] = (
    # XNNPACK kernels for the operations XLA hands to them. This is already jaxlib 0.10.2's
    # default (same results bit for bit, same step time), and the flag keeps it on if a later
    # jaxlib changes the default.
    "--xla_cpu_use_xnnpack=true",
)

# Environment variable that, set to 1, turns the defaults off (to measure without them).
DISABLE_VARIABLE = "ASCL_JAX_NO_PLATFORM_DEFAULTS"


def _flag_name(flag: str) -> str:
    return flag.split("=", 1)[0]


def cpu_platform_selected(environ: MutableMapping[str, str]) -> bool:
    """Return whether JAX may run on the CPU: `JAX_PLATFORMS` is unset or lists cpu first."""
    platforms = environ.get("JAX_PLATFORMS", "").strip().lower()
    return not platforms or platforms.split(",")[0].strip() == "cpu"


def backend_started() -> bool:
    """Return whether JAX has already created a backend, after which XLA_FLAGS has no effect."""
    bridge = sys.modules.get("jax._src.xla_bridge")
    # NOTE: `_backends` is private to JAX (0.10.2); without it the check assumes not started.
    return bool(getattr(bridge, "_backends", None))


def apply_platform_defaults(environ: MutableMapping[str, str] | None = None) -> list[str]:
    """Append the CPU defaults in `CPU_XLA_FLAGS` that `XLA_FLAGS` does not set yet.

    Nothing is added when `ASCL_JAX_NO_PLATFORM_DEFAULTS=1`, when `JAX_PLATFORMS` selects a
    platform other than cpu first, or when JAX has already started a backend (then it logs a
    warning). `environ` defaults to `os.environ`.

    Returns:
        The flags that were appended.
    """
    environ = os.environ if environ is None else environ
    if environ.get(DISABLE_VARIABLE, "") == "1" or not cpu_platform_selected(environ):
        return []
    if backend_started():
        logger.warning(
            "JAX has already started its backend, so the CPU defaults %s are not applied. Call "
            "ascl_jax.platform.apply_platform_defaults() before the first JAX computation.",
            list(CPU_XLA_FLAGS),
        )
        return []

    existing = environ.get("XLA_FLAGS", "").split()
    existing_names = {_flag_name(flag) for flag in existing}
    added = [flag for flag in CPU_XLA_FLAGS if _flag_name(flag) not in existing_names]
    if added:
        environ["XLA_FLAGS"] = " ".join(existing + added)
    return added
