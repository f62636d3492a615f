"""Fixtures shared by the test modules."""

import os
import tempfile

import jax
import pytest

from _xla_cache import xla_cache_in


@pytest.fixture(autouse=True, scope='session')
def _one_xla_cache_for_the_session(tmp_path_factory):
  """A persistent XLA cache for the session, shared by the xdist workers:
  a program one test compiled is loaded, not compiled again, where another
  test builds the same one (the mutants' oracles are their bases', the
  built-ins' tests repeat the battery's).  The suite took 537 s instead of
  601 s here with 2 workers.  A test that counts compilations turns it off
  (``no_xla_cache``); the runs the suite starts keep their own."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent   # the workers' basetemps sit side by side in it
  directory = root / 'xla-cache'
  directory.mkdir(exist_ok=True)
  with xla_cache_in(directory):
    yield


@pytest.fixture
def no_xla_cache():
  """No persistent XLA cache for the test: every program it needs is
  compiled, as in a run without one, so that counts of compilations mean
  what they say."""
  with xla_cache_in(None):
    yield


@pytest.fixture(autouse=True, scope='session')
def _temporary_files_under_pytest_s_directory(tmp_path_factory):
  """A failure's reproduction snippet saves larger operands to an ``.npz``
  in the temporary directory (``etp_testing._src.snippet``).  The suite
  fails rules on purpose, often, so that directory is one of pytest's for
  the session (kept for its last few runs, then removed), not the machine's
  ``/tmp``; ``TMPDIR`` says the same to the runs the suite starts."""
  directory = str(tmp_path_factory.mktemp('tmp'))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tempfile, 'tempdir', directory)
    patch.setenv('TMPDIR', directory)
    yield


@pytest.fixture
def x64():
  """``jax_enable_x64`` on for the test, restored afterwards."""
  old = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', old)


@pytest.fixture(params=['small', 'large'])
def case_size(request, monkeypatch):
  """Runs the test's checks as for a small case and, with
  ``SMALL_CASE_ELEMENTS`` at 0, as for a large one: checks that make their
  pieces in one program for a small case make them a few at a time for a
  large one (``primitive.vmap``, here one case per program, and
  ``yw_to_w.vmap``)."""
  from etp_testing._src import compilations
  from etp_testing._src.checks import primitive
  if request.param == 'large':
    monkeypatch.setattr(compilations, 'SMALL_CASE_ELEMENTS', 0)
    monkeypatch.setattr(primitive, 'VMAP_GROUP_BYTES', 0)
  return request.param
