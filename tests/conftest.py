"""Settings for the whole test session, applied before any test module imports JAX."""

import os

# JAX on the CPU. With libtpu installed (the [tpu] extra, for `jaxbig plan --topology`) JAX
# would otherwise look for TPU chips at every start and take libtpu's machine-wide lock,
# which the test's own subprocesses then could not get.
os.environ.setdefault('JAX_PLATFORMS', 'cpu')

import pytest  # pylint: disable=g-import-not-at-top

MESH_WORKER = pytest.StashKey()


def pytest_collection_finish(session):
  """Starts test_sharding.py's 8-device worker as soon as it is known to be needed."""
  modules = {item.module for item in session.items if item.module.__name__ == 'test_sharding'}
  for module in modules:
    folder = session.config._tmp_path_factory.mktemp('mesh')  # pylint: disable=protected-access
    session.config.stash[MESH_WORKER] = module.start_worker(folder)


def pytest_sessionfinish(session):
  """Stops the worker if the session ended before test_sharding.py collected its results."""
  started = session.config.stash.get(MESH_WORKER, None)
  if started and started[0].poll() is None:
    started[0].kill()
