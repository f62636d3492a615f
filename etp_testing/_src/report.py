"""Plain data records of what the harness measured, and their text form.

A :class:`ConsistencyReport` holds one :class:`CheckOutcome` per check run, and
each outcome the :class:`Finding` s it recorded: one per comparison or
structural problem.  Everything is JSON-serialisable (``to_dict``/``to_json``).
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Optional

# Outcome statuses.
PASSED = 'passed'
FAILED = 'failed'      # a comparison failed or a rule misbehaved
ERROR = 'error'        # the check itself could not run the primitive/rules
SKIPPED = 'skipped'    # cannot run here (the reason says why): never a pass
MEASURED = 'measured'  # passed, and reports the error of approximate weights
BAD_STATUSES = (FAILED, ERROR)
CHECKED_STATUSES = (PASSED, MEASURED)   # something was actually compared


def overall_status(statuses) -> str:
  """One status for several checks: ``failed`` if any failed or could not
  run, ``skipped`` if none was checked (every one skipped, or there were
  none), else ``passed``.  Skips beside checked ones do not change it: a
  skip is reported as a skip, and never counts as a pass."""
  statuses = list(statuses)
  if any(s in BAD_STATUSES for s in statuses):
    return FAILED
  if not any(s in CHECKED_STATUSES for s in statuses):
    return SKIPPED
  return PASSED


def _json_float(v):
  if v is None:
    return None
  v = float(v)
  return v if math.isfinite(v) else repr(v)


def strict_json_data(data):
  """``data`` with every non-finite float written as :func:`_json_float`
  writes it (``'inf'``, ``'nan'``): ``json.dumps`` would write ``Infinity``
  and ``NaN``, which strict parsers (``jq``, JavaScript) refuse."""
  if isinstance(data, float) and not math.isfinite(data):
    return _json_float(data)
  if isinstance(data, dict):
    return {k: strict_json_data(v) for k, v in data.items()}
  if isinstance(data, (list, tuple)):
    return [strict_json_data(v) for v in data]
  return data


@dataclasses.dataclass
class Finding:
  """One comparison (or structural problem) inside a check.

  Attributes:
    rule: the rule or operation under test (``xy_to_dw``, ``impl``, ...).
    key: the weight key, where there is one.
    passed: whether it is within tolerance / well-formed.
    message: what was compared, or what is wrong.
    max_abs_err: ``max |actual - expected|``.
    max_rel_err: ``max_abs_err / max |expected|``.
    index: where ``max_abs_err`` occurs (in ``actual``'s shape).
    actual_shape, expected_shape, dtype: of the compared arrays.
    rtol, atol: the bound applied (see ``etp_testing._src.tolerances``).
    scale: the bound's scale: ``max |expected|``, or, for two sums of the
      same products added in different orders, the magnitude of the terms
      where that is larger (the bound is ``atol + rtol * scale``).
    tolerance_used: ``max_abs_err / (atol + rtol * scale)``, the share of
      the bound the error takes: above 1 fails.  How close a passing
      comparison came to a false alarm, whatever its scale (a cancelling
      sum's ``max_rel_err`` can exceed ``rtol`` and still pass).
    approximate: the weight is declared approximate: measured, not judged
      (a non-finite value still fails: no approximation excuses it).
    cosine: for an approximate weight, the cosine between the measured
      gradient ``a`` and the exact one ``e``,
      :math:`\\langle a, e\\rangle / (\\|a\\| \\|e\\|)`: a step along
      :math:`-a` lowers the loss (for a small enough step) only where it is
      positive; ``None`` where ``e`` is zero.
    vacuous: both sides were zero everywhere (and so was the scale): the
      comparison could not fail for a rule that returns zeros too (a LoRA
      case with ``lora_a = 0`` gives ``lora_b`` a zero gradient).
  """

  rule: str
  key: Optional[str] = None
  passed: bool = True
  message: str = ''
  max_abs_err: Optional[float] = None
  max_rel_err: Optional[float] = None
  index: Optional[tuple] = None
  actual_shape: Optional[tuple] = None
  expected_shape: Optional[tuple] = None
  dtype: Optional[str] = None
  rtol: Optional[float] = None
  atol: Optional[float] = None
  approximate: bool = False
  scale: Optional[float] = None
  tolerance_used: Optional[float] = None
  vacuous: bool = False
  cosine: Optional[float] = None

  def to_dict(self) -> dict:
    """Plain data (JSON-serialisable), non-finite numbers as ``None``."""
    d = dataclasses.asdict(self)
    for k in ('max_abs_err', 'max_rel_err', 'rtol', 'atol', 'scale',
              'tolerance_used', 'cosine'):
      d[k] = _json_float(d[k])
    for k in ('index', 'actual_shape', 'expected_shape'):
      d[k] = None if d[k] is None else [int(i) for i in d[k]]
    return d

  def describe(self) -> str:
    """One line: the rule and key, the message, and the errors against
    their bound where numbers were compared."""
    where = f'[{self.key}]' if self.key else ''
    parts = [f'{self.rule}{where}: {self.message}']
    if self.max_abs_err is not None:
      parts.append(
          f'max abs err {self.max_abs_err:.3g}, max rel err '
          f'{self.max_rel_err:.3g} at index {self.index} '
          f'(rtol {self.rtol:g}, atol {self.atol:g}'
          + self._bound_note() + ')')
    if self.cosine is not None:
      parts.append(f'cosine with the exact gradient {self.cosine:.3g}')
    if self.actual_shape is not None or self.expected_shape is not None:
      parts.append(f'shapes actual {self.actual_shape} expected '
                   f'{self.expected_shape}'
                   + (f', dtype {self.dtype}' if self.dtype else ''))
    return '; '.join(parts)

  def _bound_note(self) -> str:
    """How much of the bound the error took, and its scale where that is
    the summed terms' rather than the result's."""
    if self.tolerance_used is None:
      return ''
    note = f'; {self.tolerance_used:.3g} of the tolerance'
    if (self.scale is not None and self.max_rel_err and self.max_abs_err
        and math.isfinite(self.max_rel_err)):
      result_scale = self.max_abs_err / self.max_rel_err
      if self.scale > result_scale * (1 + 1e-12):
        note += (f', whose scale is the summed terms\' {self.scale:.3g}, '
                 f'not the result\'s {result_scale:.3g}')
    return note


# The check groups that compare a weight's gradient (the rest compare traces,
# outputs or devices).
GRADIENT_CHECK_GROUPS = ('xy_to_dw', 'drtrl', 'pp')


@dataclasses.dataclass
class CheckOutcome:
  """The result of one named check on one primitive."""

  name: str
  status: str
  findings: list = dataclasses.field(default_factory=list)
  reason: str = ''
  duration_s: float = 0.0

  @property
  def failed(self) -> bool:
    return self.status in BAD_STATUSES

  def worst(self) -> Optional[Finding]:
    """The finding with the largest relative error, among the failed
    ones where any failed; ``None`` where those have no numbers (a wrong
    shape): the keys that passed would otherwise give the failure's
    error, a ``FAIL 0`` cell."""
    failed = [f for f in self.findings if not f.passed]
    measured = [f for f in failed or self.findings
                if f.max_rel_err is not None]
    if not measured:
      return None
    return max(measured, key=lambda f: f.max_rel_err)

  def tolerance_used(self) -> Optional[float]:
    """The largest share of its bound any judged comparison took (findings
    of approximate keys are measured, not judged); ``None`` if none."""
    used = [f.tolerance_used for f in self.findings
            if f.tolerance_used is not None and not f.approximate]
    return max(used) if used else None

  def to_dict(self) -> dict:
    """Plain data (JSON-serialisable): status, worst errors, findings."""
    worst = self.worst()
    return {
        'name': self.name, 'status': self.status, 'reason': self.reason,
        'duration_s': round(self.duration_s, 6),
        'max_abs_err': _json_float(worst.max_abs_err) if worst else None,
        'max_rel_err': _json_float(worst.max_rel_err) if worst else None,
        'tolerance_used': _json_float(self.tolerance_used()),
        'findings': [f.to_dict() for f in self.findings],
    }


@dataclasses.dataclass
class ConsistencyReport:
  """Everything :func:`etp_testing.assert_rule_consistent` measured."""

  primitive: str
  params: dict
  operands: list          # [{'shape': [...], 'dtype': '...'}] in invar order
  seed: int
  outcomes: list = dataclasses.field(default_factory=list)
  snippet: str = ''
  jax_version: str = ''
  devices: list = dataclasses.field(default_factory=list)
  duration_s: float = 0.0

  @property
  def status(self) -> str:
    """``failed`` (a check failed or could not run), ``skipped`` (no check
    compared anything: every one was skipped) or ``passed``."""
    return overall_status(o.status for o in self.outcomes)

  @property
  def passed(self) -> bool:
    """Nothing failed and at least one check was run (an all-skipped
    report is not a pass)."""
    return self.status == PASSED

  @property
  def failures(self) -> list:
    return [o for o in self.outcomes if o.failed]

  def vacuous_keys(self) -> list:
    """Weight keys whose every gradient comparison (in the ``xy_to_dw``,
    ``drtrl`` and ``pp`` checks) was zero against zero
    (:attr:`Finding.vacuous`): the gradient vanishes on this case, so the
    rules that compute it were not checked.  (The ``yw_to_w`` checks compare
    random traces, which do not vanish, and say nothing of the gradient.)"""
    vacuous = {}
    for o in self.outcomes:
      if o.name.split('.')[0] not in GRADIENT_CHECK_GROUPS:
        continue
      for f in o.findings:
        if f.key is not None and f.max_abs_err is not None:
          vacuous[f.key] = vacuous.get(f.key, True) and f.vacuous
    return sorted(k for k, v in vacuous.items() if v)

  def non_descending_keys(self) -> list:
    """Approximate weight keys whose measured gradient makes a cosine of at
    most 0 with the exact one (:attr:`Finding.cosine`) in every run of the
    case: it never points downhill.  (One run with a negative cosine is
    not enough: the reference recurrence's coefficients are random, and a
    fair approximation, every output's signal replaced by their mean,
    measured 0.53, -0.16 and 0.97 on one case.)"""
    cosines = {}
    for o in self.outcomes:
      for f in o.findings:
        if (f.approximate and f.key is not None and f.cosine is not None
            and math.isfinite(f.cosine)):
          cosines.setdefault(f.key, []).append(f.cosine)
    return sorted(k for k, c in cosines.items() if max(c) <= 0)

  def outcome(self, name: str) -> Optional[CheckOutcome]:
    """The outcome of check ``name``, or ``None`` if it was not run."""
    for o in self.outcomes:
      if o.name == name:
        return o
    return None

  def to_dict(self) -> dict:
    """Plain data (JSON-serialisable): the case and every outcome."""
    return {
        'primitive': self.primitive,
        'params': {k: _jsonable(v) for k, v in self.params.items()},
        'operands': self.operands, 'seed': self.seed,
        'status': self.status, 'passed': self.passed,
        'jax_version': self.jax_version, 'devices': self.devices,
        'duration_s': round(self.duration_s, 6),
        'outcomes': [o.to_dict() for o in self.outcomes],
        'snippet': self.snippet,
    }

  def to_json(self, **kwargs) -> str:
    """:meth:`to_dict` as strict JSON (non-finite numbers as ``'inf'``,
    ``'nan'``; ``kwargs`` go to ``json.dumps``)."""
    return json.dumps(strict_json_data(self.to_dict()), **kwargs)

  def summary_line(self) -> str:
    """``<primitive>: N passed, M skipped, ...``: the outcomes counted by
    status."""
    counts = {}
    for o in self.outcomes:
      counts[o.status] = counts.get(o.status, 0) + 1
    return f'{self.primitive}: ' + ', '.join(
        f'{n} {s}' for s, n in sorted(counts.items()))

  def case_line(self) -> str:
    """The case under test: params, operand dtypes and shapes, seed."""
    return (f'params {self.params}, operands '
            + ', '.join(f"{o['dtype']}{list(o['shape'])}"
                        for o in self.operands) + f', seed {self.seed}')

  def failure_message(self, note: str = '') -> str:
    """The text of :class:`RuleConsistencyError`: headline, details, ``note``
    (how hypothesis found the case, say), snippet.

    The snippet comes last and is not indented, so that everything from the
    line after ``Reproduce with:`` to the end pastes into ``python`` as it
    is (an indented first line is an ``IndentationError`` there).
    """
    failed = self.failures
    names = ', '.join(o.name for o in failed)
    lines = [f'[etp_testing] {self.primitive} failed {len(failed)} check(s): '
             f'{names}', '  ' + self.case_line()]
    for o in failed:
      lines.append(f'- {o.name} ({o.status})'
                   + (f': {o.reason}' if o.reason else ''))
      for f in o.findings:
        if not f.passed:
          lines.append(f'    {f.describe()}')
    if note:
      lines.append(note)
    if self.snippet:
      lines.append('Reproduce with:')
      lines.append(self.snippet.rstrip('\n'))
    return '\n'.join(lines)

  def nothing_checked_message(self) -> str:
    """The text of :class:`NothingCheckedError`: every check was skipped,
    and why."""
    lines = [f'[etp_testing] {self.primitive}: nothing was checked: all '
             f'{len(self.outcomes)} selected check(s) were skipped',
             '  ' + self.case_line()]
    lines.extend(f'- {o.name}: {o.reason}' for o in self.outcomes)
    return '\n'.join(lines)


def _jsonable(v: Any):
  if isinstance(v, (str, int, float, bool)) or v is None:
    return v
  if isinstance(v, (tuple, list)):
    return [_jsonable(i) for i in v]
  if isinstance(v, dict):
    return {str(k): _jsonable(i) for k, i in v.items()}
  return repr(v)
