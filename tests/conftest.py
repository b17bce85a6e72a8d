"""Test set-up: 8 simulated XLA CPU devices, set before jax is imported anywhere; one persistent compilation cache
for the whole session (this process and the trainer/island processes the tests start), so that the many runs of the
same tiny programs compile once: it halves a test that trains, stops and resumes. It starts empty and is removed at
exit, so no state crosses sessions."""

import atexit
import os
import shutil
import tempfile

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="intellect-jax-test-xla-cache-")
    atexit.register(shutil.rmtree, _cache, True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")
