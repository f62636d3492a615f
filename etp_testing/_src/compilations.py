"""Counting XLA compilations, to prove that compiled oracles are reused.

Every backend compilation JAX performs (a ``jax.jit`` of a new shape, and every
eager op on a shape it has not seen) is reported through ``jax.monitoring`` as
a ``backend_compile`` duration event.  :func:`counting` listens to them:

    with counting() as c:
      ...
    print(c.count, c.seconds)

The listener is registered once per process and only counts while some
:func:`counting` block is open.
"""

from __future__ import annotations

import contextlib
import dataclasses

import jax

# The event JAX records for each backend compilation (stable since jax 0.4).
BACKEND_COMPILE_EVENT = '/jax/core/compile/backend_compile_duration'

_open: list = []
_registered = False


@dataclasses.dataclass(eq=False)   # nested blocks are told apart by identity
class CompileCount:
  """Compilations seen while a :func:`counting` block was open."""
  count: int = 0
  seconds: float = 0.0


def _listener(event: str, duration_secs: float, **_):
  if event == BACKEND_COMPILE_EVENT:
    for c in _open:
      c.count += 1
      c.seconds += duration_secs


@contextlib.contextmanager
def counting():
  """Counts XLA backend compilations (and their seconds) inside the block."""
  global _registered
  if not _registered:
    jax.monitoring.register_event_duration_secs_listener(_listener)
    _registered = True
  c = CompileCount()
  _open.append(c)
  try:
    yield c
  finally:
    _open.remove(c)
