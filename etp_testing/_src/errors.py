"""Errors raised by the harness.  Every message starts with ``[etp_testing]``."""

from __future__ import annotations

import functools
from typing import Optional

PREFIX = '[etp_testing] '


class RuleConsistencyError(AssertionError):
  """An ETP primitive failed one or more checks.

  The first line names the primitive and the failed checks; the body lists
  each failure with the rule, the weight key, the errors and where they occur,
  the shapes and dtypes, and a snippet that re-runs the failing case.  The full
  :class:`etp_testing.ConsistencyReport` is on ``.report``.
  """

  def __init__(self, message: str, report):
    super().__init__(message)
    self.report = report


class VacuousCaseWarning(UserWarning):
  """A case on which some weight's true gradient is zero everywhere (LoRA's
  ``lora_b`` with ``lora_a = 0``): every gradient comparison of that key
  was zero against zero, so a rule that returns zeros, or the negated
  gradient, passes.  The other keys were checked; this one needs other
  operands."""


class ApproximateGradientWarning(UserWarning):
  """A weight declared approximate whose D-RTRL gradient, in every run of
  a case, makes a cosine of at most 0 with ``jax.grad``'s: a step against
  it never lowers the loss, so training with it does not learn (a
  ``yw_to_w`` that drops the trace gives cosine 0, a sign error -1).  Not a failure, as the weight was
  declared approximate; the findings hold the measured errors and cosines.
  """


class NothingCheckedError(RuleConsistencyError):
  """Every check selected for a case was skipped: nothing was proven.

  Not a failure of any rule, but not a pass either (a primitive with no
  trainable operand asked only for ``xy_to_dw``, or ``device.consistency``
  on one device with nothing pinned).  The message lists each check with
  the reason it was skipped; ``.report`` holds the report.  The pytest
  ``etp_check`` fixture turns it into a skip.
  """


class StrategyError(TypeError):
  """A strategy drew something other than ``(operands, params)``.

  The message says what it drew and what a strategy draws; reports show it
  without a traceback, which would be the harness's alone.
  """


class CheckSkipped(Exception):
  """Raised inside a check that cannot run here; the reason is reported."""


class RuleFailure(Exception):
  """Raised inside a check for a structural failure (wrong keys, a raising rule).

  Attributes name the rule and key, so the report can say exactly what broke.
  """

  def __init__(self, rule: str, message: str, key=None):
    super().__init__(message)
    self.rule = rule
    self.key = key
    self.message = message


# The packages between a battery run and the user's code.
MACHINERY = ('hypothesis', '_pytest', 'pytest', 'pluggy')


def package_dirs(*names) -> tuple:
  """The directories of the importable packages ``names`` (with a trailing
  separator), for telling their frames apart."""
  import importlib.util
  import os
  dirs = []
  for name in names:
    spec = importlib.util.find_spec(name)
    if spec is not None and spec.origin:
      dirs.append(os.path.dirname(os.path.abspath(spec.origin)) + os.sep)
  return tuple(dirs)


# Libraries a user's rule or strategy calls into: a frame there is not where
# their code went wrong.
LIBRARIES = ('jax', 'jaxlib', 'numpy', 'saiunit', 'chex')


@functools.lru_cache(maxsize=1)
def _installed_dirs() -> tuple:
  """The standard library's and the installed packages' directories."""
  import os
  import sysconfig
  paths = sysconfig.get_paths()
  return tuple(os.path.abspath(paths[k]) + os.sep for k in (
      'stdlib', 'platstdlib', 'purelib', 'platlib') if paths.get(k))


def where_raised(error: BaseException) -> Optional[str]:
  """``'<file>:<line> in <function>'``: the innermost frame ``error`` passed
  through that is the user's code (a rule, an impl, a strategy; not the
  harness, pytest, hypothesis, JAX or NumPy), or ``None``.  The file is
  relative to the working directory where it lies below it."""
  import os
  import traceback
  skip = package_dirs('etp_testing', *MACHINERY, *LIBRARIES)
  frames = [f for f in traceback.extract_tb(error.__traceback__)
            if not f.filename.startswith(skip) and not f.filename.startswith(
                '<') and f.filename not in _etp_machinery_files()]
  # Any other installed library or the standard library (opt_einsum under
  # jnp.einsum) is not where the user's code went wrong either, unless
  # the user's code is installed there too (then only those frames are left).
  own = [f for f in frames if not f.filename.startswith(_installed_dirs())]
  frames = own or frames
  if not frames:
    return None
  frame = frames[-1]
  path = frame.filename
  try:
    relative = os.path.relpath(path)
  except ValueError:   # another drive (Windows)
    relative = path
  if not relative.startswith('..'):
    path = relative
  return f'{path}:{frame.lineno} in {frame.name}'


@functools.lru_cache(maxsize=1)
def _etp_machinery_files() -> frozenset:
  """The files of etp that call the user's impl and rules (not the
  built-ins' own impls and rules, which are code of this project's users
  too): an impl called with the wrong operands raises there."""
  from etp._src import primitive, registry
  return frozenset((primitive.__file__, registry.__file__))


def returned_kind(value) -> str:
  """What a rule returned, for a message: ``'an array'`` for anything with
  a shape (a traced value's class name would mean nothing to its author),
  else the type's name."""
  return 'an array' if hasattr(value, 'shape') else type(value).__name__


def raised(what: str, error: BaseException, detail: str = '') -> str:
  """``'<what> raised <Type>: <message> (<detail>, at <where>)'``, where as
  :func:`where_raised` finds it (the parts in brackets where known)."""
  where = where_raised(error)
  notes = [n for n in (detail, where and f'at {where}') if n]
  return (f'{what} raised {type(error).__name__}: {error}'
          + (f' ({", ".join(notes)})' if notes else ''))


def describe_exception(error: BaseException) -> str:
  """``Type: message``, where it was raised (:func:`where_raised`), and its
  notes (hypothesis's "while generating ..." says that a strategy raised),
  but not hypothesis's advice to decorate a test with
  ``@reproduce_failure``, which a battery run does not have."""
  lines = [f'{type(error).__name__}: {error}']
  where = where_raised(error)
  if where:
    lines.append(f'raised at {where}')
  lines += [n for n in getattr(error, '__notes__', ()) or ()
            if n.strip() and '@reproduce_failure' not in n
            and not n.lstrip().startswith(_HYPOTHESIS_EXAMPLE_NOTES)]
  return '\n'.join(lines)


# Hypothesis's notes that print the failing example as a call of the
# harness's own test function (``run(case=(make(0), make(0)))``): nothing a
# user can read or re-run; the message says what was drawn.
_HYPOTHESIS_EXAMPLE_NOTES = ('Falsifying example', 'Failing test case',
                             'Falsifying explicit example')
