"""The JSON report of a battery run: ``pytest --etp-report PATH`` and
``etp-check --report PATH`` write the same document.

Per primitive and check, a record of :data:`FIELDS`: the status, the worst
errors, the share of its bound the closest comparison took, the seed and
examples (those asked for: a failing run stops at its first failing
example, which hypothesis shrinks, and the message says after how many
examples it failed), the seconds, the reasons it skipped (``[]`` for
none), the XLA programs compiled and loaded (``None`` where they are not
counted per check: ``etp-check`` runs every check of a primitive on each
example, and counts its programs for the whole run), a failure's message
and the harness's warnings about its cases (``VacuousCaseWarning``,
``ApproximateGradientWarning``; ``etp-check`` gives each check of a
primitive those of the whole primitive's run).  Beside them: the versions,
devices, compiler options, totals per status and the run's compilations.
Non-finite numbers are written ``"inf"``, ``"nan"`` (strict JSON).
"""

from __future__ import annotations

import contextlib
import platform
import warnings

from etp_testing._src.errors import (ApproximateGradientWarning,
                                     RuleConsistencyError,
                                     VacuousCaseWarning, describe_exception)

VERSION = 1
# A check's record, in this order.
FIELDS = ('status', 'max_abs_err', 'max_rel_err', 'tolerance_used', 'seed',
          'examples', 'duration_s', 'skip_reasons', 'compiled', 'loaded',
          'message', 'warnings')
# The warnings a record keeps: what the harness says about a case that
# passed (a vanishing gradient, an approximate one that never descends).
RECORDED_WARNINGS = (VacuousCaseWarning, ApproximateGradientWarning)


@contextlib.contextmanager
def recording_warnings():
  """Yields a list that, once the block ends, holds the messages of the
  :data:`RECORDED_WARNINGS` it raised (each once, in order), for a record's
  ``warnings``; every warning is raised again after it, for pytest's
  summary or the terminal."""
  messages, caught = [], []
  try:
    with warnings.catch_warnings(record=True) as caught:
      for category in RECORDED_WARNINGS:   # each, not once per place
        warnings.simplefilter('always', category)
      yield messages
  finally:
    for w in caught:
      if issubclass(w.category, RECORDED_WARNINGS) and (
          str(w.message) not in messages):
        messages.append(str(w.message))
      warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)


def failure_fields(check: str, error: Exception) -> dict:
  """The record fields of a check that raised ``error``: ``failed`` with
  its worst errors for a rule failure, ``error`` for anything else (a
  strategy's or the harness's own exception)."""
  if not isinstance(error, RuleConsistencyError):
    return {'status': 'error', 'message': describe_exception(error),
            'skip_reasons': []}
  return {'status': 'failed', 'message': str(error), 'skip_reasons': [],
          **_errors(error.report.outcome(check))}


def _errors(outcome) -> dict:
  """A ``CheckOutcome``'s worst errors and largest share of its bound
  (``None`` each, for no outcome or nothing compared)."""
  worst = outcome.worst() if outcome else None
  return {'max_abs_err': worst.max_abs_err if worst else None,
          'max_rel_err': worst.max_rel_err if worst else None,
          'tolerance_used': outcome.tolerance_used() if outcome else None}


def summary_records(summary, seed) -> dict:
  """``{check: record}`` of a passing ``check_with_hypothesis`` run."""
  return {name: {'status': c.status, 'max_abs_err': c.max_abs_err,
                 'max_rel_err': c.max_rel_err,
                 'tolerance_used': c.tolerance_used, 'seed': seed,
                 'examples': c.examples, 'duration_s': c.duration_s,
                 'skip_reasons': c.skip_reasons}
          for name, c in summary.checks.items()}


def failure_records(error, checks, seed, examples) -> dict:
  """``{check: record}`` of a run that raised ``error``: for a rule
  failure, every check of the failing example's report (the failed ones
  with the message); for anything else, ``error`` for each of ``checks``."""
  if not isinstance(error, RuleConsistencyError):
    return {name: {'seed': seed, 'examples': examples,
                   **failure_fields(name, error)} for name in checks}
  records = {}
  for outcome in error.report.outcomes:
    record = {'seed': seed, 'examples': examples,
              'duration_s': outcome.duration_s}
    if outcome.status in ('failed', 'error'):
      record.update(failure_fields(outcome.name, error),
                    status=outcome.status)
    else:
      record.update(_errors(outcome), status=outcome.status,
                    skip_reasons=[outcome.reason] if outcome.reason else [])
    records[outcome.name] = record
  return records


def document(records, *, seed, examples, duration_s, compile_cache,
             compiled, loaded, unchecked, **extra) -> dict:
  """The report: ``records`` maps ``(primitive, check)`` to a record (any
  of :data:`FIELDS` missing is ``None``); ``compiled``/``loaded`` are the
  run's XLA programs; ``extra`` keys are added as they are."""
  import jax
  import etp
  from etp_testing._src import compilations
  checks = {}
  for (prim, check), record in sorted(records.items()):
    checks.setdefault(prim, {})[check] = {k: record.get(k) for k in FIELDS}
  statuses = [r['status'] for r in records.values()]
  return {
      'etp_report_version': VERSION,
      'jax_version': jax.__version__,
      'python_version': platform.python_version(),
      'devices': [str(d) for d in jax.devices()],
      'etp_testing_version': etp.__version__,   # one distribution
      'seed': seed, 'examples': examples, 'duration_s': duration_s,
      'compile_cache': compile_cache,
      'compiler_options': compilations.options_in_effect(),
      'totals': {s: statuses.count(s) for s in sorted(set(statuses))},
      'compilations': {'compiled': compiled, 'loaded': loaded},
      'unchecked_primitives': unchecked,
      'primitives': checks,
      **extra,
  }
