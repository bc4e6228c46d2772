"""Settings for the whole test session, applied before any test module imports JAX."""

import os

# JAX on the CPU. With libtpu installed (the [tpu] extra, for `jaxbig plan --topology`) JAX
# would otherwise look for TPU chips at every start and take libtpu's machine-wide lock,
# which the test's own subprocesses then could not get.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
