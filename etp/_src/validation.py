"""Argument checks shared by the user-facing functions.

Every message starts with the ``[etp]`` prefix and names the function, the
argument, and the shape that was expected, so a user never has to read a
traceback from inside a primitive.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import numpy as np

from etp._src.registry import ERROR_PREFIX


def fail(fn: str, message: str, exc=ValueError):
  raise exc(f'{ERROR_PREFIX}{fn}: {message}')


def check_ndim(fn: str, arg: str, value, allowed: Sequence[int], expected: str,
               hint: str = ''):
  """Raises unless ``value.ndim`` is one of ``allowed``."""
  ndim = np.ndim(value)
  if ndim not in allowed:
    fail(fn, f'`{arg}` must have shape {expected}, got shape '
             f'{tuple(np.shape(value))} (rank {ndim}).{(" " + hint) if hint else ""}')


def check_dim(fn: str, arg: str, value, axis: int, size: int, expected: str,
              against: str):
  """Raises unless ``value.shape[axis] == size``."""
  shape = tuple(np.shape(value))
  if shape[axis] != size:
    fail(fn, f'`{arg}` must have shape {expected} to match {against}, got '
             f'shape {shape}.')


def check_floating(fn: str, arg: str, value):
  """Raises unless ``value`` has a floating dtype."""
  dtype = jnp.result_type(value)
  if not jnp.issubdtype(dtype, jnp.floating):
    fail(fn, f'`{arg}` must be floating point, got dtype {dtype}.', TypeError)


def is_concrete(value) -> bool:
  """Whether ``value`` holds data we can inspect (not a tracer)."""
  try:
    np.asarray(value)
    return True
  except Exception:  # pylint: disable=broad-except  (tracers refuse)
    return False
