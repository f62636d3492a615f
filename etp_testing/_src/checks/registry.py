"""The named checks, in the order they run.

A check is a function ``check(ctx: CheckContext) -> None`` registered under a
dotted name (``group.what``).  It records findings through ``ctx.compare`` /
``ctx.fail``, raises ``CheckSkipped`` when it cannot run here, and raises
``RuleFailure`` for a rule that misbehaves structurally.  Names are selected
with ``checks=``: ``'all'``, exact names, group names (``'xy_to_dw'``), or glob
patterns (``'*.fd'``).
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
from typing import Callable

from etp_testing._src.errors import PREFIX


@dataclasses.dataclass(frozen=True)
class CheckSpec:
  name: str
  fn: Callable
  doc: str

  @property
  def group(self) -> str:
    return self.name.split('.')[0]


_CHECKS: dict = {}


def check(name: str):
  """Registers ``fn`` as the check called ``name``."""
  def register(fn):
    if name in _CHECKS:
      raise ValueError(f'{PREFIX}check {name!r} is registered twice')
    _CHECKS[name] = CheckSpec(name, fn, (fn.__doc__ or '').strip())
    return fn
  return register


def check_names() -> tuple:
  """Every check name, in run order."""
  return tuple(_CHECKS)


def get(name: str) -> CheckSpec:
  return _CHECKS[name]


def select(checks='all') -> list:
  """Check names matching ``checks`` (see the module docstring), in run order.

  Raises:
    ValueError: a pattern matches no check (a typo must not silently run
      nothing).
  """
  if checks is None or checks == 'all':
    return list(_CHECKS)
  if isinstance(checks, str):
    checks = [c.strip() for c in checks.split(',') if c.strip()]
  # Cached: a fast-mode check_rules call on a large layer costs well under a
  # millisecond of Python, and matching the patterns was a twentieth of it.
  return list(_select(tuple(checks), tuple(_CHECKS)))


@functools.lru_cache(maxsize=256)
def _select(checks: tuple, known: tuple) -> tuple:
  """:func:`select`'s matching, per patterns and registered checks."""
  chosen = set()
  for pattern in checks:
    hits = [n for n in known
            if fnmatch.fnmatchcase(n, pattern) or n.split('.')[0] == pattern]
    if not hits:
      raise ValueError(f'{PREFIX}no check matches {pattern!r}; known checks: '
                       f'{", ".join(known)}')
    chosen.update(hits)
  return tuple(n for n in known if n in chosen)
