"""``assert_rule_consistent``: run the battery on one case and judge it."""

from __future__ import annotations

import functools
import time
import warnings
from collections.abc import Mapping
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

import etp
from etp_testing._src import checks as _checks  # registers the checks
from etp_testing._src import case_faults, compilations
from etp_testing._src import snippet as _snippet
from etp_testing._src.checks import registry as check_registry
from etp_testing._src.context import (CheckContext, dtype_str,
                                      operand_avals, x64_enabled, y_aval)
from etp_testing._src.errors import (PREFIX, ApproximateGradientWarning,
                                     CheckSkipped, NothingCheckedError,
                                     RuleConsistencyError, RuleFailure,
                                     VacuousCaseWarning, raised)
from etp_testing._src.report import (ERROR, FAILED, MEASURED, PASSED, SKIPPED,
                                     CheckOutcome, ConsistencyReport)

del _checks


def resolve_devices(devices='all') -> list:
  """``'all'``, ``'cpu'``, ``'gpu'`` or a list of devices -> a device list.

  ``'gpu'`` with no GPU present gives an empty list; the device check then
  reports itself skipped (never passed).
  """
  if devices is None or devices == 'all':
    return list(_all_devices())
  if isinstance(devices, str):
    try:
      return list(jax.devices(devices))
    except RuntimeError:
      return []
  return list(devices)


@functools.lru_cache(maxsize=1)
def _all_devices() -> tuple:
  """Every CPU, GPU and TPU device, asked once: a process's backends do not
  change once started, and asking for an absent one raises, which cost a
  fast-mode check_rules call 20 us every time."""
  found = []
  for backend in ('cpu', 'gpu', 'tpu'):
    try:
      found.extend(jax.devices(backend))
    except RuntimeError:
      pass
  return tuple(found)


# The helpers below take the operands as check_rules leaves them: each has a
# dtype (lists and scalars became NumPy arrays there).


def _operand_info(operands) -> list:
  return [{'shape': [int(s) for s in np.shape(o)], 'dtype': dtype_str(o.dtype)}
          for o in operands]


def _wants_x64(operands) -> bool:
  return any(o.dtype == np.float64 for o in operands)


def _validate_case(primitive, operands, params, avals) -> Optional[tuple]:
  """``(what, why)``: why the case cannot be checked (``what`` is
  ``'bind'`` where binding fails, ``'operands'`` where the operands cannot
  be trained), or ``None``.  ``avals``: the operands' ``operand_avals``
  (``None``: ask for them here)."""
  try:
    y = y_aval(primitive, operands, params, avals)
  except Exception as e:  # pylint: disable=broad-except
    shapes = [tuple(np.shape(o)) for o in operands]
    return 'bind', (raised(
        f'binding {primitive.name} on shapes {shapes} with params {params}',
        e, 'the operands (in a hypothesis run, the case its strategy drew) '
        'do not fit the primitive, or its impl raises'))
  # Complex numbers: the contract and the oracles are for real ones (JAX's
  # jacrev wants real outputs, and which of a VJP's conjugates a rule should
  # return is not fixed), and finite differences along a real direction drop
  # the imaginary part: a wrong conj(x)^T g passed xy_to_dw.fd.
  complex_parts = [f'operand {i}: {o.dtype}' for i, o in enumerate(operands)
                   if jnp.issubdtype(o.dtype, jnp.complexfloating)]
  if jnp.issubdtype(y.dtype, jnp.complexfloating):
    complex_parts.append(f'the output: {y.dtype}')
  if complex_parts:
    return 'operands', (
        f'{primitive.name}: complex values ({", ".join(complex_parts)}): the '
        'rule contract and the harness are for real numbers; check a real '
        'case (a complex layer as two real operands, its real and '
        'imaginary parts)')
  # Empty arrays: nothing to compare, so no rule would be checked (and the
  # harness's own reductions have no maximum to take).
  empty = [f'operand {i}: {tuple(o.shape)}' for i, o in enumerate(operands)
           if 0 in tuple(o.shape)]
  if 0 in tuple(y.shape):
    empty.append(f'the output: {tuple(y.shape)}')
  if empty:
    return 'operands', (
        f'{primitive.name}: empty arrays, with a dimension of size 0 '
        f'({", ".join(empty)}): there is nothing to compare, so no rule '
        'would be checked; give every dimension at least 1')
  # A gradient w.r.t. an integer or boolean operand is not defined: every
  # rule check would fail, each in JAX's words, none saying why.
  for key, i in primitive.trainable_invars(params).items():
    dtype = operands[i].dtype
    if not jnp.issubdtype(dtype, jnp.inexact):
      return 'operands', (
          f'trainable operand {key!r} (operand {i}) of {primitive.name} is '
          f'{dtype}: gradients, and so the rules, are defined for floating '
          'weights only; pass it as a float array (an operand that is not '
          'trained belongs in aux_invars_fn)')
  return None


def run_check(name: str, ctx: CheckContext) -> CheckOutcome:
  """Runs one check and turns whatever happens into a :class:`CheckOutcome`."""
  spec = check_registry.get(name)
  ctx.findings = []
  start = time.perf_counter()
  status, reason = PASSED, ''
  try:
    spec.fn(ctx)
  except CheckSkipped as e:
    status, reason = SKIPPED, str(e)
  except RuleFailure as e:
    ctx.fail(e.rule, e.message, key=e.key)
  except Exception as e:  # pylint: disable=broad-except
    status, reason = ERROR, f'{type(e).__name__}: {e}'
  findings = list(ctx.findings)
  failed_rules = sorted({f.rule for f in findings if not f.passed})
  if status in (PASSED, SKIPPED) and failed_rules:
    # A check that found a failure and then skipped the rest of its work
    # (fast mode's memory budget) still failed: a skip never hides a finding.
    skipped = f' (the rest of the check skipped: {reason})' if reason else ''
    status, reason = FAILED, '; '.join(failed_rules) + skipped
  elif status == PASSED and any(f.approximate for f in findings):
    status = MEASURED
  return CheckOutcome(name=name, status=status, findings=findings,
                      reason=reason, duration_s=time.perf_counter() - start)


# Every check runs float32 matrix products at full float32 precision. On
# GPUs JAX's default for float32 is TF32 (a 10-bit mantissa, relative error
# near 1e-3), which is a property of the hardware setting, not of a rule: at
# float32 tolerances it raises false alarms (an H200 flagged the correct dense
# xy_to_dw at 2.5e-4), and a looser tolerance would hide real errors.
# Products that pass an explicit ``precision=`` keep it.
MATMUL_PRECISION = 'highest'


def _reject_quantities(name: str, operands) -> None:
  """Raises a clear ``TypeError`` for a ``saiunit`` quantity among the
  operands (NumPy's own error comes from deep inside the report)."""
  import saiunit as u
  for i, o in enumerate(operands):
    if isinstance(o, u.Quantity):
      raise TypeError(
          f'{PREFIX}operand {i} of {name} is a saiunit Quantity (unit '
          f'{o.unit}); ETP primitives and their rules bind unitless arrays: '
          'pass its mantissa (q.mantissa, or q.to_decimal(unit)).  The '
          "'units' check covers the unit-aware functions.")


def _case_words(report) -> str:
  """The case a warning is about, as a failure's message gives it."""
  return f'(the case: {report.case_line()})'


def _warn_if_vacuous(report) -> None:
  """A :class:`VacuousCaseWarning` naming the keys whose every gradient
  comparison was zero against zero."""
  keys = report.vacuous_keys()
  if keys:
    warnings.warn(VacuousCaseWarning(
        f'{PREFIX}{report.primitive}: every gradient comparison of '
        f'{", ".join(keys)} was zero against zero on this case (the true '
        'gradient vanishes here, as for LoRA\'s lora_b with lora_a = 0), so '
        'the rules that compute it were not checked: give operands for which '
        f'it does not vanish {_case_words(report)}'), stacklevel=3)


def _warn_if_not_descending(report) -> None:
  """An :class:`ApproximateGradientWarning` naming the approximate weights
  whose measured gradient does not point downhill (cosine <= 0)."""
  keys = report.non_descending_keys()
  if keys:
    warnings.warn(ApproximateGradientWarning(
        f'{PREFIX}{report.primitive}: {", ".join(keys)} declared '
        'approximate, and in every run of this case the D-RTRL gradient '
        'makes a cosine of at most 0 with jax.grad\'s (see the drtrl '
        'findings): a step against it never lowers the loss, so training '
        'with it would not learn; look at the trace rules for these '
        f'weights {_case_words(report)}'),
                  stacklevel=3)


def require_etp_primitive(primitive) -> None:
  """Raises ``TypeError`` unless ``primitive`` is an ETP primitive: a
  usage error, not a case whose checks fail."""
  if not etp.is_etp_primitive(primitive):
    raise TypeError(f'{PREFIX}{getattr(primitive, "name", primitive)!s} is '
                    'not an ETP primitive (create it with '
                    'etp.register_primitive)')


def recurrence_settings(steps, n_state) -> tuple:
  """``n_state`` as a tuple, after checking both: a usage error otherwise.

  ``steps`` must be at least 2: ``init_drtrl``'s traces are zero, so over
  one step ``yw_to_w`` (and the cross-time term) only ever sees zeros, and
  a wrong ``yw_to_w`` passes every D-RTRL check.  ``n_state``: a whole
  number >= 1, or a non-empty sequence of them (an empty one would run no
  recurrence and report nothing)."""
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) \
      or steps < 2:
    raise ValueError(
        f'{PREFIX}steps={steps!r}: the recurrence needs at least 2 steps '
        '(over one, the traces yw_to_w links are init_drtrl\'s zeros, so '
        'nothing checks it); the default is 3')
  try:
    n_states = (n_state,) if isinstance(n_state, (int, np.integer)) \
        else tuple(n_state)
  except TypeError:   # neither a number nor a sequence (1.5, None)
    n_states = ()
  if not n_states or any(isinstance(n, bool) or not isinstance(
      n, (int, np.integer)) or n < 1 for n in n_states):
    raise ValueError(
        f'{PREFIX}n_state={n_state!r}: give a whole number >= 1 or a '
        'non-empty sequence of them (hidden states per output; the default '
        'is (1, 2))')
  return tuple(int(n) for n in n_states)


# The options of check_rules and assert_rule_consistent: a bind param of one
# of these names can only be given through ``params=``.
OPTION_NAMES = ('checks', 'rtol', 'atol', 'seed', 'steps', 'n_state',
                'devices', 'fast', 'params')


def bind_params(params, keyword_params) -> dict:
  """The bind params: ``params`` (a mapping, or ``None``) and the
  keyword arguments, which must not name the same param twice."""
  if params is None:
    return dict(keyword_params)
  if not isinstance(params, Mapping):
    raise TypeError(
        f'{PREFIX}params={params!r}: give the bind params as a mapping '
        '(params={...}); a bind param named params goes inside it')
  both = sorted(set(params) & set(keyword_params))
  if both:
    raise TypeError(f'{PREFIX}bind params {both} given both in params= and '
                    'as keyword arguments')
  return {**params, **keyword_params}


def check_rules(primitive, *operands, checks='all', rtol=None, atol=None,
                seed: int = 0, steps: int = 3, n_state: Sequence[int] = (1, 2),
                devices='all', fast=None, params: Optional[Mapping] = None,
                **bind_kwargs) -> ConsistencyReport:
  """Like :func:`assert_rule_consistent`, but returns the report, never raises
  for failed checks (only for unknown check names, a primitive that is not
  an ETP one and ``saiunit`` quantities as operands)."""
  params = bind_params(params, bind_kwargs)
  names = check_registry.select(checks)
  require_etp_primitive(primitive)
  n_states = recurrence_settings(steps, n_state)
  name = getattr(primitive, 'name', repr(primitive))
  _reject_quantities(name, operands)
  # A Python list or scalar becomes the array NumPy makes of it (float64 for
  # floats), so the checks, the report and its snippet see one array.
  operands = tuple(o if hasattr(o, 'dtype') else np.asarray(o)
                   for o in operands)
  # Long runs compile a program per new shape; bound what stays alive.
  compilations.release_if_over()
  report = ConsistencyReport(
      primitive=name, params=dict(params), operands=_operand_info(operands),
      seed=int(seed), jax_version=jax.__version__)
  start = time.perf_counter()
  old_x64 = jax.config.jax_enable_x64
  try:
    # NumPy's floating-point warnings off: the checks' host arithmetic on a
    # non-finite or overflowing case would warn from the harness's lines,
    # and the report already says what is not finite, and where.
    with x64_enabled(old_x64 or _wants_x64(operands)), \
        jax.default_matmul_precision(MATMUL_PRECISION), \
        np.errstate(all='ignore'):
      device_list = resolve_devices(devices)
      report.devices = [str(d) for d in device_list]
      # Asked once (each costs microseconds) and shared with the context.
      try:
        avals = operand_avals(operands)
      except Exception:  # pylint: disable=broad-except
        avals = None     # not JAX types: _validate_case says so
      invalid = _validate_case(primitive, operands, params, avals)
      if invalid is not None:
        report.outcomes.append(case_faults.case_error(*invalid))
        return report
      ctx = CheckContext(primitive, operands, params, seed=seed, steps=steps,
                         n_states=n_states, rtol=rtol, atol=atol,
                         devices=device_list, fast=fast, avals=avals)
      for check_name in names:
        report.outcomes.append(run_check(check_name, ctx))
      _warn_if_vacuous(report)
      _warn_if_not_descending(report)
      if report.failures:
        case_faults.blame_the_case(ctx, report)
  finally:
    # Leave global state as found, whatever a check or rule did to it.
    jax.config.update('jax_enable_x64', old_x64)
    report.duration_s = time.perf_counter() - start
    if report.failures:
      # Only a failure needs re-running (writing a large layer's operands
      # out costs more than some checks), and only its failed checks (all
      # of them where the case itself failed, before any check ran).
      failed = {o.name for o in report.failures}
      rerun = [n for n in names if n in failed] or names
      report.snippet = _snippet.reproduction(
          primitive, operands, params, seed=seed, checks=rerun, steps=steps,
          n_state=n_states, devices=devices, fast=fast, rtol=rtol, atol=atol,
          x64=old_x64, option_names=OPTION_NAMES)
  return report


def assert_rule_consistent(primitive, *operands, checks='all', rtol=None,
                           atol=None, seed: int = 0, steps: int = 3,
                           n_state: Sequence[int] = (1, 2), devices='all',
                           fast=None, params: Optional[Mapping] = None,
                           **bind_kwargs) -> ConsistencyReport:
  """Proves an ETP primitive's rules right on one case, or says what is wrong.

  Args:
    primitive: an ETP primitive (built-in or from ``etp.register_primitive``).
    *operands: concrete operands in the primitive's invar order: arrays
      (NumPy or JAX), or Python lists and scalars, taken as ``np.asarray``
      makes them (float64 for floats, so checked with x64 on).
    checks: ``'all'``, or names / groups / glob patterns (see ``check_names``).
    rtol, atol: override the per-dtype tolerance table for every comparison.
    seed: fixes every drawn input (cotangents, traces, recurrence
      coefficients, the input sequence, directions).
    steps: recurrence length for the D-RTRL and pp-prop checks (at least
      2: over one step ``yw_to_w`` only ever sees zero traces).
    n_state: hidden states per output for the D-RTRL check (a whole number
      >= 1, or a non-empty tuple of them).
    devices: ``'all'``, ``'cpu'``, ``'gpu'`` or a list of devices.
    fast: random-projection mode (no full Jacobians, sampled anchors);
      ``None`` (default) turns it on above ``FAST_MODE_THRESHOLD`` Jacobian
      entries, ``True``/``False`` force it.
    params: the primitive's bind params as a mapping, for a param whose name
      is one of these options' (``seed``, ``steps``, ``checks``, ...);
      others may come as keyword arguments too.
    **bind_kwargs: the primitive's bind params.

  Returns:
    The :class:`ConsistencyReport`: every check passed, measured or skipped,
    and at least one was not skipped.

  Raises:
    RuleConsistencyError: a check failed or could not run; its message names
      the primitive, the failed checks and rules, the errors and where they
      occur, and a snippet that reproduces the case; ``.report`` holds it all.
    NothingCheckedError: (a ``RuleConsistencyError``) every selected check
      was skipped, so nothing was proven; the message gives each reason.
    TypeError: ``primitive`` is not an ETP primitive, or an operand is a
      ``saiunit`` quantity (pass its mantissa).
    ValueError: an unknown check name, ``steps < 2``, or an ``n_state``
      that is empty or not a whole number >= 1.
  """
  report = check_rules(primitive, *operands, checks=checks, rtol=rtol,
                       atol=atol, seed=seed, steps=steps, n_state=n_state,
                       devices=devices, fast=fast,
                       params=bind_params(params, bind_kwargs))
  if report.failures:
    raise RuleConsistencyError(report.failure_message(), report)
  if not report.passed:
    raise NothingCheckedError(report.nothing_checked_message(), report)
  return report


def check_names() -> tuple:
  """Every check the harness has, in run order."""
  return check_registry.check_names()
