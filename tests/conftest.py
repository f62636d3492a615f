"""Fixtures shared by the test modules."""

import jax
import pytest


@pytest.fixture
def x64():
  """``jax_enable_x64`` on for the test, restored afterwards."""
  old = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', True)
  yield
  jax.config.update('jax_enable_x64', old)
