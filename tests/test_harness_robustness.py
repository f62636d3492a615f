"""The harness under abuse: every way a primitive can be wrong is a diagnosis.

Missing rules, a rule returning the wrong keys / shapes / dtypes / NaN / Inf,
a rule that raises, an impl that raises, operands that do not fit: each must
end in a :class:`etp_testing.RuleConsistencyError` whose message names the
primitive, the check, the rule, the key and the shapes - never a bare
traceback from inside JAX, and never an outcome that only says a check
crashed.  The harness must also leave global state as it found it (the
``jax_enable_x64`` flag, ``etp.primitives()``, ``jax.devices()``, the matmul
precision), its report must be JSON, and the reproduction snippet in the
error message must re-run the failing case.
"""

import importlib
import itertools
import json
import os
import re
import runpy
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.interpreters import ad
from jax.interpreters import batching

import etp
import etp_testing
from etp._src import dense
from etp._src import registry
from etp_testing._src.report import BAD_STATUSES

_counter = itertools.count()
_BASE = etp.rules_of(etp.etp_mm_p)


@pytest.fixture(autouse=True)
def _restore_state():
  """Restores x64 and forgets the primitives a test registers."""
  x64 = jax.config.jax_enable_x64
  before = set(etp.primitives())
  yield
  jax.config.update('jax_enable_x64', x64)
  for p in etp.primitives():
    if p not in before:
      registry._forget(p)


def _name(tag):
  return f'test_robustness_{tag}_{next(_counter)}'


def _make(tag, *, impl=dense._impl, rules=True, **overrides):
  """A batched dense primitive; ``rules=False`` registers no ETP rules."""
  prim = etp.register_primitive(_name(tag), impl, batched=True,
                                trainable_invars_fn=dense._trainable)
  if rules:
    kwargs = dict(yw_to_w=_BASE.yw_to_w, xy_to_dw=_BASE.xy_to_dw,
                  init_drtrl=_BASE.init_drtrl, init_pp=_BASE.init_pp)
    kwargs.update(overrides)
    prim.register_etp_rules(**kwargs)
  return prim


def _operands(batch=4, n_in=3, n_out=5, dtype=np.float32, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.standard_normal((batch, n_in)).astype(dtype),
          rng.standard_normal((n_in, n_out)).astype(dtype)]


def _with_weight(fn):
  """An ``xy_to_dw`` whose 'weight' gradient is ``fn(right gradient)``."""
  def xy_to_dw(x, g, weights, **params):
    grads = dense._xy_to_dw(x, g, weights, **params)
    return {**grads, 'weight': fn(grads['weight'])}
  return xy_to_dw


def _raise(*args, **kwargs):
  raise ValueError('deliberately broken')


def _this_file_as_reported():
  # As messages name a file: from the working directory where it lies
  # below it, else absolute (pytest may run from anywhere).
  path = os.path.relpath(__file__)
  return __file__ if path.startswith('..') else path


# Where a message says _raise raised (a rule's own frame, not the harness's
# or JAX's).
_RAISE_AT = (f'at {_this_file_as_reported()}:'
             f'{_raise.__code__.co_firstlineno + 1} in _raise')


# The rule variants run every check that calls a rule; the primitive.*
# checks never do (they hold the JAX rules to impl), so they are left out.
RULE_CHECKS = [n for n in etp_testing.check_names()
               if not n.startswith('primitive.')]


# (tag, how to build it, check that must fail, rule, key, text in message)
BROKEN = [
    ('missing_rules', dict(rules=False), 'xy_to_dw.vjp', 'xy_to_dw', None,
     "rule 'xy_to_dw' is not registered"),
    ('wrong_keys', dict(xy_to_dw=lambda x, g, w, **p: {
        'W': dense._xy_to_dw(x, g, w, **p)['weight']}),
     'xy_to_dw.vjp', 'xy_to_dw', None, "returned keys ['W']"),
    ('wrong_shape', dict(xy_to_dw=_with_weight(lambda v: v.T)),
     'xy_to_dw.vjp', 'xy_to_dw', 'weight', 'shape (5, 3) != expected (3, 5)'),
    ('wrong_dtype', dict(xy_to_dw=_with_weight(
        lambda v: v.astype(jnp.float16))),
     'xy_to_dw.vjp', 'xy_to_dw', 'weight', 'dtype float16'),
    ('nan', dict(xy_to_dw=_with_weight(lambda v: v * jnp.nan)),
     'xy_to_dw.vjp', 'xy_to_dw', 'weight', ''),
    ('inf', dict(xy_to_dw=_with_weight(lambda v: v.at[0, 0].set(jnp.inf))),
     'xy_to_dw.vjp', 'xy_to_dw', 'weight', ''),
    ('xy_to_dw_raises', dict(xy_to_dw=_raise), 'xy_to_dw.vjp', 'xy_to_dw',
     None, 'xy_to_dw raised ValueError: deliberately broken (called with '),
    ('yw_to_w_raises', dict(yw_to_w=_raise), 'yw_to_w.anchor', 'yw_to_w',
     None, 'yw_to_w raised ValueError: deliberately broken (called with '),
    ('init_drtrl_raises', dict(init_drtrl=_raise), 'init.drtrl',
     'init_drtrl', None, 'init_drtrl raised ValueError: deliberately broken '
     f'(n_state=1, {_RAISE_AT})'),
    ('init_pp_raises', dict(init_pp=_raise), 'init.pp', 'init_pp', None,
     f'init_pp raised ValueError: deliberately broken (n_state=1, '
     f'{_RAISE_AT})'),
    # The array a dict should hold: every check that composes the rule (the
    # reference executor's included) names it, not a pytree mismatch.
    ('xy_to_dw_array', dict(xy_to_dw=lambda x, g, w, **p: dense._xy_to_dw(
        x, g, w, **p)['weight']), 'drtrl.exact', 'xy_to_dw', None,
     'xy_to_dw returned an array, expected a dict'),
    ('yw_to_w_array', dict(yw_to_w=lambda g, t, **p: dense._yw_to_w(
        g, t, **p)['weight']), 'drtrl.exact', 'yw_to_w', None,
     'yw_to_w returned an array, expected a dict'),
]


def _assert_diagnosis(err, prim, check, rule, key, text):
  report = err.report
  message = str(err)
  assert message.startswith(f'[etp_testing] {prim.name} failed'), message
  assert 'float32[4, 3], float32[3, 5]' in message  # the operand shapes
  outcome = report.outcome(check)
  assert outcome is not None and outcome.status == 'failed', (
      check, outcome and outcome.status, outcome and outcome.reason)
  hits = [f for f in outcome.findings if not f.passed and f.rule == rule
          and (key is None or f.key == key) and text in f.describe()]
  assert hits, [f.describe() for f in outcome.findings]
  assert f'- {check} (failed)' in message
  assert (f'{rule}[{key}]:' if key else f'{rule}:') in message
  if key is not None:
    assert hits[0].actual_shape is not None
    assert 'shapes actual' in message
  assert 'Reproduce with:' in message


@pytest.mark.parametrize('tag, build, check, rule, key, text', BROKEN,
                         ids=[b[0] for b in BROKEN])
def test_a_broken_rule_is_a_diagnosis(tag, build, check, rule, key, text):
  prim = _make(tag, **build)
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.assert_rule_consistent(prim, *_operands(), checks=RULE_CHECKS,
                                       steps=2, n_state=1, has_bias=False)
  _assert_diagnosis(info.value, prim, check, rule, key, text)
  if tag.endswith('_raises'):   # and where: the rule's line, not JAX's
    assert _RAISE_AT + ')' in str(info.value)
  # Every failing check is diagnosed (a finding naming a rule), none only
  # crashed with an error from inside JAX.
  crashed = [(o.name, o.reason) for o in info.value.report.outcomes
             if o.status == 'error']
  assert not crashed, crashed
  if tag.endswith('_array'):   # every check that failed blames the rule
    blamed = {(o.name, f.rule) for o in info.value.report.outcomes
              for f in o.findings if not f.passed}
    assert blamed and {r for _, r in blamed} == {rule}, blamed


@pytest.mark.parametrize('settings,text', [
    (dict(steps=1), 'steps=1: the recurrence needs at least 2 steps'),
    (dict(steps=0), 'steps=0: the recurrence needs at least 2 steps'),
    (dict(n_state=()), 'n_state=(): give a whole number >= 1'),
    (dict(n_state=0), 'n_state=0: give a whole number >= 1'),
    (dict(n_state=(1, 0)), 'n_state=(1, 0): give a whole number >= 1'),
    (dict(n_state=1.5), 'n_state=1.5: give a whole number >= 1'),
], ids=['one_step', 'no_step', 'no_state', 'zero_states', 'a_zero_state',
        'fractional'])
def test_settings_that_check_nothing_are_usage_errors(settings, text):
  # Over one step yw_to_w sees only init_drtrl's zero traces, and with no
  # n_state no recurrence runs: either way a wrong yw_to_w passed.
  wrong_link = _make('yw_to_w_sign_for_steps',
                     yw_to_w=lambda g, t, **p: {k: -v * g[..., None, :]
                                                for k, v in t.items()})
  with pytest.raises(ValueError, match=re.escape(text)):
    etp_testing.check_rules(wrong_link, *_operands(), has_bias=False,
                            **settings)
  with pytest.raises(ValueError, match=re.escape(text)):
    etp_testing.check_with_hypothesis(etp.etp_mv_p, max_examples=1,
                                      **settings)


def test_two_steps_catch_the_wrong_link():
  wrong_link = _make('yw_to_w_sign_two_steps',
                     yw_to_w=lambda g, t, **p: {k: -v * g[..., None, :]
                                                for k, v in t.items()})
  report = etp_testing.check_rules(wrong_link, *_operands(), steps=2,
                                   n_state=np.int64(1), checks='drtrl.exact',
                                   has_bias=False)
  assert report.outcome('drtrl.exact').status == 'failed'


def _xy_to_dw_with_a_shape_bug(x, g, weights, **params):
  return {'weight': jnp.dot(x, jnp.ones((7, 7), x.dtype))}


def test_a_rule_raising_inside_jax_is_located_in_the_rule():
  """The innermost frame of the user's code, not of jax.numpy, where the
  exception was raised."""
  prim = _make('xy_to_dw_shape_bug', xy_to_dw=_xy_to_dw_with_a_shape_bug)
  report = etp_testing.check_rules(prim, *_operands(), checks='xy_to_dw.vjp',
                                   has_bias=False)
  line = _xy_to_dw_with_a_shape_bug.__code__.co_firstlineno + 1
  assert (f'{_this_file_as_reported()}:{line} in _xy_to_dw_with_a_shape_bug'
          in report.failure_message())
  assert 'jax/' not in report.failure_message()


@pytest.mark.parametrize('where', ['impl', 'operands'])
def test_an_impl_that_raises_or_operands_that_do_not_fit(where):
  if where == 'impl':
    prim, ops, text = _make('impl_raises', impl=_raise), _operands(), \
        'ValueError: deliberately broken'
  else:
    prim = _make('misfit')
    ops = [_operands()[0], _operands(n_in=4)[1]]  # (4, 3) @ (4, 5)
    text = 'TypeError'
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.assert_rule_consistent(prim, *ops, has_bias=False)
  message = str(info.value)
  assert message.startswith(f'[etp_testing] {prim.name} failed')
  assert f'on shapes {[tuple(o.shape) for o in ops]}' in message
  assert text in message
  outcome = info.value.report.outcome('operands')
  assert outcome.status == 'error' and outcome.findings[0].rule == 'bind'


def test_operands_an_impl_cannot_take_are_not_located_in_etp_s_machinery():
  # impl(x, w) bound with three operands raises in etp's own call of it:
  # that line is not the user's mistake, so no location is given (it was
  # etp/_src/primitive.py, in _abstract_eval).
  prim = _make('two_operands', impl=lambda x, w, **params: x @ w)
  x, w = _operands()
  report = etp_testing.check_rules(prim, x, w, w[0], has_bias=True)
  message = report.failure_message()
  assert 'takes 2 positional arguments but 3 were given' in message
  assert 'primitive.py' not in message and ' at ' not in message.split(
      'Reproduce with')[0]


@pytest.mark.parametrize('dtype', [np.int32, np.bool_])
def test_a_weight_that_cannot_be_trained_is_an_operands_error(dtype):
  # Not one failure per rule check in JAX's words (float0 tangents, jacrev
  # refusing integers, rounding): one error that says why.
  x, w = _operands()[:2]
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.assert_rule_consistent(etp.etp_mm_p, x, w.astype(dtype),
                                       has_bias=False)
  report = info.value.report
  assert [o.name for o in report.outcomes] == ['operands']
  assert report.outcomes[0].findings[0].rule == 'operands'
  assert (f"trainable operand 'weight' (operand 1) of etp_mm is "
          f'{np.dtype(dtype)}') in str(info.value)
  # Integer operands that are not trained are fine (sparse indices).
  etp_testing.assert_rule_consistent(
      etp.etp_sp_mm_p, x, w[:, 0].copy(),
      np.array([[0, 0], [1, 1], [2, 2]], np.int32), checks='xy_to_dw.vjp',
      shape=(3, 5), has_bias=False)


def test_broken_jax_rules_are_diagnosed_not_crashes():
  # A JVP rule and a batching rule that raise: failed findings naming the
  # JAX rule, with the operands, from the primitive checks.
  prim = _make('jax_rules_raise')
  ad.primitive_jvps[prim] = _raise
  batching.primitive_batchers[prim] = _raise
  report = etp_testing.check_rules(
      prim, *_operands(), checks=['primitive', 'device'], has_bias=False)
  for check, rule in (('primitive.jvp', 'jvp'),
                      ('primitive.vmap', 'batching')):
    outcome = report.outcome(check)
    assert outcome.status == 'failed', (check, outcome.reason)
    bad = [f for f in outcome.findings if not f.passed]
    assert bad and all(f.rule == rule for f in bad)
    assert 'ValueError: deliberately broken' in bad[0].message
    assert 'float' in bad[0].message  # operand dtypes and shapes
  assert report.outcome('primitive.jit').status == 'passed'


def _multi(y_index=1):
  """A primitive with outputs ``(x @ W, tanh(x @ W))``, ``y`` at
  ``y_index``."""
  def impl(x, weight):
    y = x @ weight
    return y, jnp.tanh(y)
  return etp.register_primitive(
      _name('multi'), impl, batched=True, multiple_results=True,
      y_outvar_index=y_index, trainable_invars_fn=lambda p: {'weight': 1})


def test_a_multiple_results_primitive_passes_the_primitive_checks():
  report = etp_testing.check_rules(_multi(), *_operands(),
                                   checks=['primitive'])
  for outcome in report.outcomes:
    assert outcome.status == 'passed', (outcome.name, outcome.reason,
                                        [f.describe() for f in
                                         outcome.findings])


def test_the_primitive_checks_judge_every_output_not_only_y():
  # JAX derives every output's rules from impl; a JVP or a batching rule
  # wrong for an output other than y is as wrong (it trained nothing here,
  # but a model using that output gets wrong gradients or values).
  doubled = _multi(y_index=0)
  derived_jvp = ad.primitive_jvps[doubled]

  def jvp(primals, tangents, **params):
    out, t = derived_jvp(primals, tangents, **params)
    return out, [t[0], 2.0 * t[1]]
  ad.primitive_jvps[doubled] = jvp
  outcome = etp_testing.check_rules(doubled, *_operands(),
                                    checks=['primitive.jvp']).outcomes[0]
  assert outcome.status == 'failed' and outcome.reason == 'jvp', outcome

  reversed_ = _multi(y_index=0)

  def batcher(args, dims, **params):
    args = [a if d is None else jnp.moveaxis(a, d, 0)
            for a, d in zip(args, dims)]
    axes = [None if d is None else 0 for d in dims]
    y, aux = jax.vmap(lambda *a: reversed_.impl_fn(*a, **params),
                      in_axes=axes)(*args)
    return [y, jnp.flip(aux, 0)], [0, 0]   # output 1's examples reversed
  batching.primitive_batchers[reversed_] = batcher
  outcome = etp_testing.check_rules(reversed_, *_operands(),
                                    checks=['primitive.vmap']).outcomes[0]
  assert outcome.status == 'failed', outcome
  bad = [f for f in outcome.findings if not f.passed]
  assert bad and all(f.message.startswith('output 1: ') for f in bad), \
      [f.describe() for f in bad]


# ------------------------------------------------------------- global state
@pytest.mark.parametrize('x64', [False, True])
@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_the_x64_flag_is_left_as_found(x64, dtype):
  jax.config.update('jax_enable_x64', x64)
  ops = _operands(dtype=dtype)
  checks = ['primitive.jvp', 'xy_to_dw.fd', 'device.consistency']
  etp_testing.check_rules(etp.etp_mm_p, *ops, checks=checks,
                          has_bias=False)
  assert jax.config.jax_enable_x64 == x64
  # Also when the run fails and when a rule raises.
  with pytest.raises(etp_testing.RuleConsistencyError):
    etp_testing.assert_rule_consistent(_make('x64_raises', xy_to_dw=_raise),
                                       *ops, checks=checks, has_bias=False)
  assert jax.config.jax_enable_x64 == x64


def test_a_run_leaves_global_state_as_found():
  primitives = etp.primitives()
  devices = jax.devices()
  precision = jax.config.jax_default_matmul_precision
  jvp = ad.primitive_jvps[etp.etp_mv_p]
  x, weight = _operands()
  report = etp_testing.check_rules(etp.etp_mv_p, x[0], weight, checks='all',
                                   devices=devices[:2], has_bias=False)
  # The whole battery on a correct built-in: nothing failed, nothing crashed.
  assert not [o for o in report.outcomes if o.status in BAD_STATUSES], (
      report.failure_message())
  etp_testing.check_rules(etp.etp_mm_p, *_operands(), devices='cpu',
                          checks=['device'], has_bias=False)
  assert etp.primitives() == primitives
  assert jax.devices() == devices
  assert jax.config.jax_default_matmul_precision == precision
  assert ad.primitive_jvps[etp.etp_mv_p] is jvp


# -------------------------------------------------------------------- report
def test_the_report_is_json():
  good = etp_testing.check_rules(etp.etp_mm_p, *_operands(),
                                 checks=['xy_to_dw.vjp', 'units', 'device'],
                                 has_bias=False)
  bad = etp_testing.check_rules(
      _make('json_nan', xy_to_dw=_with_weight(lambda v: v * jnp.nan)),
      *_operands(), checks=['xy_to_dw.vjp', 'primitive.jit'], has_bias=False)
  for report in (good, bad):
    # Strict JSON: non-finite errors are written as strings.
    data = json.loads(report.to_json(allow_nan=False))
    assert data['primitive'] == report.primitive
    assert data['passed'] == report.passed
    assert data['status'] == report.status
    assert [o['name'] for o in data['outcomes']] == [
        o.name for o in report.outcomes]
    assert data['operands'] == [{'shape': [4, 3], 'dtype': 'float32'},
                                {'shape': [3, 5], 'dtype': 'float32'}]
    for o in data['outcomes']:
      assert o['status'] in ('passed', 'failed', 'error', 'skipped',
                             'measured')
      for f in o['findings']:
        assert isinstance(f['rule'], str) and isinstance(f['passed'], bool)
  assert not data['passed']
  vjp = data['outcomes'][0]
  assert vjp['status'] == 'failed' and vjp['max_abs_err'] == 'inf'
  assert vjp['findings'][0]['key'] == 'weight'


# ----------------------------------------------------- nothing checked
def test_a_case_on_which_every_check_skips_is_not_a_pass():
  # etp_mm has no instant rules: drtrl.instant can only skip.
  with pytest.raises(etp_testing.NothingCheckedError) as info:
    etp_testing.assert_rule_consistent(etp.etp_mm_p, *_operands(),
                                       checks=['drtrl.instant'],
                                       has_bias=False)
  message = str(info.value)
  assert message.startswith('[etp_testing] etp_mm: nothing was checked')
  assert '- drtrl.instant: ' in message and 'instant_drtrl' in message
  report = info.value.report
  assert report.status == 'skipped' and not report.passed
  assert not report.failures and not report.snippet   # not a failure either
  assert isinstance(info.value, etp_testing.RuleConsistencyError)


def test_a_skip_beside_a_checked_check_still_passes():
  report = etp_testing.assert_rule_consistent(
      etp.etp_mm_p, *_operands(), checks=['xy_to_dw.vjp', 'drtrl.instant'],
      has_bias=False)
  assert report.status == 'passed' and report.passed
  assert report.outcome('drtrl.instant').status == 'skipped'


def test_a_hypothesis_run_on_which_every_check_skips_is_not_a_pass():
  summary = etp_testing.check_with_hypothesis(
      etp.etp_mv_p, max_examples=2, checks=['drtrl.instant'], seed=0)
  assert summary.examples == 2
  assert summary.status == 'skipped' and not summary.passed
  assert summary.to_dict()['status'] == 'skipped'




@pytest.mark.parametrize('entry', ['assert_rule_consistent', 'check_rules',
                                   'check_with_hypothesis'])
def test_a_primitive_that_is_not_an_etp_one_is_a_usage_error(entry):
  """Not a failed case with a snippet that re-runs it: there is nothing to
  re-run.  An ETP primitive passes the same gate (every other test)."""
  from hypothesis import strategies as st
  x = np.ones(3, np.float32)
  calls = {
      'assert_rule_consistent': lambda: etp_testing.assert_rule_consistent(
          jax.lax.add_p, x, x),
      'check_rules': lambda: etp_testing.check_rules(jax.lax.add_p, x, x),
      'check_with_hypothesis': lambda: etp_testing.check_with_hypothesis(
          jax.lax.add_p, max_examples=1, strategy=st.just(((x, x), {}))),
  }
  with pytest.raises(TypeError) as e:
    calls[entry]()
  assert not isinstance(e.value, etp_testing.RuleConsistencyError)
  assert str(e.value) == ('[etp_testing] add is not an ETP primitive (create '
                          'it with etp.register_primitive)')


def _nan_at(a, index):
  a = np.array(a)
  a[index] = np.nan
  return a


@pytest.mark.parametrize('where', ['nan-x', 'inf-weight-on-device'])
def test_non_finite_operands_are_the_case_s_fault_not_a_rule_s(where):
  """Right rules on NaN or inf operands: the report is one operands error
  naming the operand, the count and where, not the checks' failures, which
  blame right rules.  A passing case never scans its operands for it."""
  x, w = _operands()
  if where == 'nan-x':
    ops, i, text = [_nan_at(x, (1, 2)), w], 0, '1 NaN or inf value(s), the ' \
        'first at index (1, 2)'
  else:
    ops, i, text = [x, jnp.full(w.shape, jnp.inf, w.dtype)], 1, \
        f'{w.size} NaN or inf value(s), the first at index (0, 0)'
  import warnings
  with warnings.catch_warnings(record=True) as warned:
    warnings.simplefilter('always')
    report = etp_testing.check_rules(etp.etp_mm_p, *ops, has_bias=False)
  # No NumPy warning from the harness's host arithmetic on the NaN.
  assert not [w for w in warned if issubclass(w.category, RuntimeWarning)], \
      [str(w.message) for w in warned]
  assert [(o.name, o.status) for o in report.outcomes] == [
      ('operands', 'error')]
  assert report.outcomes[0].reason.startswith(
      f'operand {i} of etp_mm (float32{list(ops[i].shape)}) holds {text}')
  assert 'allow_nan=False' in report.outcomes[0].reason
  from etp_testing._src import case_faults
  scanned = []
  real = case_faults.non_finite
  case_faults.non_finite = lambda *a: scanned.append(1) or real(*a)
  try:
    assert etp_testing.check_rules(etp.etp_mm_p, x, w, has_bias=False).passed
  finally:
    case_faults.non_finite = real
  assert scanned == []


def test_complex_operands_are_refused_with_the_reason():
  """Not seven checks crashing in NumPy's or JAX's words (jacrev wants real
  outputs), and not xy_to_dw.fd passing a wrong conj(x)^T g because its
  real directions drop the imaginary part: one error that says why."""
  x, w = _operands()[:2]
  report = etp_testing.check_rules(etp.etp_mm_p, x.astype(np.complex64),
                                   (w + 1j * w).astype(np.complex64),
                                   has_bias=False)
  assert [(o.name, o.status) for o in report.outcomes] == [
      ('operands', 'error')]
  assert report.outcomes[0].reason == (
      'etp_mm: complex values (operand 0: complex64, operand 1: complex64, '
      'the output: complex64): the rule contract and the harness are for '
      'real numbers; check a real case (a complex layer as two real '
      'operands, its real and imaginary parts)')


@pytest.mark.parametrize('x_shape, w_shape, empty', [
    ((2, 0), (0, 4), 'operand 0: (2, 0), operand 1: (0, 4)'),
    ((2, 3), (3, 0), 'operand 1: (3, 0), the output: (2, 0)'),
    ((0, 3), (3, 4), 'operand 0: (0, 3), the output: (0, 4)'),
])
def test_empty_operands_are_refused_with_the_reason(x_shape, w_shape, empty):
  """Not a ZeroDivisionError blamed on the rules ("the reference executor
  could not compose the rules") or an argmax of nothing."""
  report = etp_testing.check_rules(etp.etp_mm_p, np.ones(x_shape, np.float32),
                                   np.ones(w_shape, np.float32),
                                   has_bias=False)
  assert [(o.name, o.status) for o in report.outcomes] == [
      ('operands', 'error')]
  assert report.outcomes[0].reason == (
      f'etp_mm: empty arrays, with a dimension of size 0 ({empty}): there is '
      'nothing to compare, so no rule would be checked; give every dimension '
      'at least 1')


def test_a_case_whose_y_overflows_says_so_before_the_failures():
  """Finite operands whose product overflows float32: the checks fail (the
  comparisons hold inf), and the report says first that y is not finite, so
  the failures may say nothing about the rules."""
  x = np.full((2, 3), 3e38, np.float32)
  w = np.full((3, 4), 2.0, np.float32)
  report = etp_testing.check_rules(etp.etp_mm_p, x, w, has_bias=False)
  first = report.outcomes[0]
  assert (first.name, first.status) == ('operands', 'error')
  assert first.reason.startswith('y = etp_mm(operands) (float32[2, 4]) holds '
                                 '8 NaN or inf value(s), the first at index '
                                 '(0, 0): the case overflows its dtype')
  assert len(report.failures) > 1
  message = report.failure_message()
  assert message.index('overflows its dtype') < message.index(
      '- xy_to_dw.vjp (failed)')
  # A failing case whose y is finite gets no such note.
  prim = _make('sign_for_overflow', xy_to_dw=_with_weight(lambda v: -v))
  report = etp_testing.check_rules(prim, *_operands(), has_bias=False)
  assert report.failures and all(o.name != 'operands'
                                 for o in report.outcomes)


# Its draws include all-zero arrays, on which the gradients vanish: each is
# named in a VacuousCaseWarning, as it should be, and is no news here.
@pytest.mark.filterwarnings(
    'ignore::etp_testing._src.errors.VacuousCaseWarning')
def test_hypothesis_s_default_float_arrays_end_in_the_operands_not_a_rule():
  """A user's strategy from ``hypothesis.extra.numpy.arrays`` with its
  default elements draws NaN, inf and huge values; with right rules, the
  minimal failing case hypothesis reports blames the operands."""
  from hypothesis import strategies as st
  from hypothesis.extra import numpy as hnp
  strategy = st.tuples(st.tuples(hnp.arrays(np.float32, (2, 3)),
                                 hnp.arrays(np.float32, (3, 4))),
                       st.just({'has_bias': False}))
  with pytest.raises(etp_testing.RuleConsistencyError) as e:
    etp_testing.check_with_hypothesis(
        etp.etp_mm_p, max_examples=50, seed=0, strategy=strategy,
        checks=['xy_to_dw.vjp', 'primitive.jit'])
  message = str(e.value)
  assert '- operands (error): ' in message and 'NaN or inf value(s)' in (
      message), message

_MV_OPERANDS = (np.ones(2, np.float32), np.ones((2, 3), np.float32))


@pytest.mark.parametrize('drawn,described', [
    (_MV_OPERANDS, 'tuple of 2 (float32[2], float32[2, 3])'),
    ([_MV_OPERANDS, {}], 'list of 2 (tuple of 2'),
    ((_MV_OPERANDS, None), 'tuple of 2 (tuple of 2'),
    ({'x': _MV_OPERANDS[0]}, 'dict'),
])
def test_a_strategy_that_draws_no_operands_and_params_is_told_so(
    drawn, described):
  """A strategy's draw that is not ``(operands, params)`` ends in one
  sentence saying what it drew and what a strategy draws, not in a
  ``TypeError`` from unpacking it inside the checks."""
  from hypothesis import strategies as st
  from etp_testing._src.errors import StrategyError
  with pytest.raises(StrategyError) as e:
    etp_testing.check_with_hypothesis(
        etp.etp_mv_p, max_examples=1, seed=0, checks=['xy_to_dw.vjp'],
        strategy=st.just(drawn))
  message = str(e.value)
  assert message.startswith('[etp_testing] the strategy for etp_mv drew a '
                            + described), message
  assert 'a strategy draws (operands, params)' in message
  assert isinstance(e.value, TypeError)


def test_operands_drawn_as_a_list_are_accepted():
  from hypothesis import strategies as st
  summary = etp_testing.check_with_hypothesis(
      etp.etp_mv_p, max_examples=1, seed=0, checks=['xy_to_dw.vjp'],
      strategy=st.just((list(_MV_OPERANDS), {'has_bias': False})))
  assert summary.passed and summary.examples == 1

# ------------------------------------------------------------------- snippet
@pytest.fixture(scope='module')
def broken_module():
  """``tests/_broken_prims`` imported by name (registers its primitive)."""
  module = importlib.import_module('_broken_prims')
  yield module
  registry._forget(module.broken_sign_mm_p)
  sys.modules.pop('_broken_prims', None)


@pytest.mark.parametrize('size', ['inline', 'npz'])
@pytest.mark.parametrize('dtype', [np.float32, np.float64, np.float16,
                                   jnp.bfloat16], ids=lambda d: d.__name__)
def test_the_snippet_reruns_the_failing_case(broken_module, size, dtype):
  # bfloat16 is no NumPy dtype: np.bfloat16 does not exist, and np.savez
  # stores it as raw void bytes that JAX refuses.
  batch, n_in = (4, 3) if size == 'inline' else (12, 8)  # 96 > 64 elements
  ops = _operands(batch=batch, n_in=n_in, dtype=dtype)
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.assert_rule_consistent(broken_module.broken_sign_mm_p, *ops,
                                       checks=['xy_to_dw.vjp'], seed=3,
                                       has_bias=False)
  snippet = info.value.report.snippet
  # Last and not indented: from the line after 'Reproduce with:' to the end
  # of the message pastes into python as it is.
  assert snippet and str(info.value).endswith(
      '\nReproduce with:\n' + snippet.rstrip('\n'))
  assert 'import _broken_prims' in snippet
  assert ('np.load' in snippet) == (size == 'npz')
  with pytest.raises(etp_testing.RuleConsistencyError) as again:
    exec(compile(snippet, '<snippet>', 'exec'), {'__name__': '__snippet__'})
  first, second = info.value.report, again.value.report
  assert second.primitive == first.primitive and second.seed == 3
  assert second.operands == first.operands   # shapes and dtypes
  assert [o.name for o in second.failures] == ['xy_to_dw.vjp']
  np.testing.assert_allclose(second.failures[0].findings[0].max_abs_err,
                             first.failures[0].findings[0].max_abs_err)


def test_the_snippet_reruns_only_the_checks_that_failed(broken_module):
  ops = _operands(batch=4, n_in=3, dtype=np.float32)
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.assert_rule_consistent(broken_module.broken_sign_mm_p, *ops,
                                       seed=3, has_bias=False)
  first = info.value.report
  failed = [o.name for o in first.failures]
  assert 1 < len(failed) < len(first.outcomes), failed
  assert f'checks={failed!r}' in first.snippet, first.snippet
  with pytest.raises(etp_testing.RuleConsistencyError) as again:
    exec(compile(first.snippet, '<snippet>', 'exec'),
         {'__name__': '__snippet__'})
  assert [o.name for o in again.value.report.outcomes] == failed


def test_the_snippet_says_when_its_primitive_is_not_registered():
  # A primitive registered in a script (__main__) or inside a function is
  # not there in a fresh process: the snippet says where to run it instead
  # of raising a bare StopIteration.
  doubled = lambda x, g, weights, **params: {
      k: 2 * v for k, v in _BASE.xy_to_dw(x, g, weights, **params).items()}
  prim = _make('unregistered_later', xy_to_dw=doubled)
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.assert_rule_consistent(prim, *_operands(), has_bias=False,
                                       checks=['xy_to_dw.vjp'])
  snippet = info.value.report.snippet
  registry._forget(prim)
  with pytest.raises(LookupError) as lookup:
    exec(compile(snippet, '<snippet>', 'exec'), {'__name__': '__snippet__'})
  # Registered inside a function of this module: importing it does not.
  assert str(lookup.value) == (
      f'{prim.name} is not registered: run this where the code that '
      'registers it has run (importing test_harness_robustness did not)')


def test_saved_cases_of_the_same_bytes_in_other_shapes_do_not_collide():
  # The .npz file is named by a digest: of the data alone, a (12, 8) case
  # and a (8, 12) case of the same bytes loaded each other's file.
  from etp_testing._src import snippet
  data = np.arange(96, dtype=np.float32)
  paths = {snippet._operand_source([data.reshape(shape)])[1][0]
           for shape in ((12, 8), (8, 12), (96,))}
  paths.add(snippet._operand_source([data.view(np.int32)])[1][0])
  assert len(paths) == 4, paths


@pytest.mark.parametrize('options', [{}, {'fast': True, 'rtol': 1e-4}])
def test_the_snippet_reruns_with_the_options_the_case_failed_with(
    broken_module, options):
  # A case that failed in fast mode (or at a given tolerance) re-runs the
  # same way: on a small case, the default would run the full Jacobian.
  ops = _operands(batch=4, n_in=3, dtype=np.float32)
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.assert_rule_consistent(broken_module.broken_sign_mm_p, *ops,
                                       checks=['xy_to_dw.jacrev'], seed=3,
                                       has_bias=False, **options)
  snippet = info.value.report.snippet
  for name in ('fast', 'rtol', 'atol', 'devices'):
    assert (f'{name}=' in snippet) == (name in options), snippet
  with pytest.raises(etp_testing.RuleConsistencyError) as again:
    exec(compile(snippet, '<snippet>', 'exec'), {'__name__': '__snippet__'})
  first, second = (e.value.report.failures[0].findings[0]
                   for e in (info, again))
  assert ('fast mode' in second.message) == bool(options.get('fast'))
  assert second.message == first.message
  assert second.rtol == first.rtol


def _matmul_taking_any_params(x, w, **params):
  return x @ w


def _negated_matmul_rules(prim):
  prim.register_etp_rules(
      xy_to_dw=lambda x, g, weights, **p: {'weight': -jnp.einsum(
          '...i,...o->io', x, g).astype(weights['weight'].dtype)},
      yw_to_w=lambda g, t, **p: {'weight': g[..., None, :] * t['weight']},
      init_drtrl=lambda x, y, w, n: etp.rule_util.weight_shaped_traces(
          x, y, w, n, batched=True),
      init_pp=etp.rule_util.pp_trace)
  return prim


# Values whose repr is no Python source: the snippet wrote `nan`,
# `dtype('float32')`, `<class 'numpy.float32'>`, `<Precision.HIGHEST: 2>`.
ODD_PARAMS = {'eps': float('nan'), 'big': float('-inf'),
              'dt': np.dtype('float32'), 'half': np.dtype(jnp.bfloat16),
              'kind': np.float32, 'bkind': jnp.bfloat16,
              'n': np.int64(3), 'f': np.float32(0.25),
              'nested': (1, ('a', None), (True, 2.5)),
              'precision': jax.lax.Precision.HIGHEST}


def test_the_snippet_writes_params_of_any_kind():
  from etp_testing._src import snippet
  for k, v in ODD_PARAMS.items():
    if k == 'precision':
      assert snippet.value_source(v) is None   # pickled instead
      continue
    back = eval(snippet.value_source(v), {'np': np, 'jnp': jnp})
    assert type(back) is type(v), k
    if k in ('eps', 'big'):
      assert str(back) == str(v)
    else:
      assert back == v, k
  for v in ([1, (2.5,)], {'k': [None]}):   # not bind params (unhashable)
    assert eval(snippet.value_source(v)) == v
  prim = _negated_matmul_rules(etp.register_primitive(
      _name('odd_params'), _matmul_taking_any_params, batched=True,
      trainable_invars_fn=lambda p: {'weight': 1}))
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.assert_rule_consistent(prim, *_operands(),
                                       checks=['xy_to_dw.vjp'], **ODD_PARAMS)
  snippet_source = info.value.report.snippet
  assert 'pickle.load' in snippet_source   # the enum
  with pytest.raises(etp_testing.RuleConsistencyError) as again:
    exec(compile(snippet_source, '<snippet>', 'exec'),
         {'__name__': '__snippet__'})
  assert [o.name for o in again.value.report.failures] == ['xy_to_dw.vjp']
  assert again.value.report.params.keys() == ODD_PARAMS.keys()
  # A param that neither a literal nor pickle can carry: said so.
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.assert_rule_consistent(prim, *_operands(),
                                       checks=['xy_to_dw.vjp'],
                                       fn=lambda v: v)
  with pytest.raises(NotImplementedError, match='cannot write the bind '
                     'params fn = <function'):
    exec(compile(info.value.report.snippet, '<snippet>', 'exec'),
         {'__name__': '__snippet__'})


def test_bind_params_named_like_the_harness_s_options():
  # A bind param named seed or steps was taken as the harness's option (the
  # report said params {}) or, through hypothesis, the fixture and the
  # plugin, raised a TypeError 180 lines long.
  from hypothesis import strategies as st
  prim = _negated_matmul_rules(etp.register_primitive(
      _name('option_named'), _matmul_taking_any_params, batched=True,
      trainable_invars_fn=lambda p: {'weight': 1}))
  params = {'seed': 7, 'steps': 'many', 'scale': 2.0}
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.check_with_hypothesis(
        prim, strategy=st.just((tuple(_operands()), params)), max_examples=1,
        seed=0, checks=['xy_to_dw.vjp'])
  report = info.value.report
  assert report.params == params and report.seed == 0
  assert [o.name for o in report.failures] == ['xy_to_dw.vjp']
  assert "params={'seed': 7, 'steps': 'many', 'scale': 2.0}" in report.snippet
  with pytest.raises(etp_testing.RuleConsistencyError) as again:
    exec(compile(report.snippet, '<snippet>', 'exec'),
         {'__name__': '__snippet__'})
  assert again.value.report.params == params
  # params= and keyword arguments together, but not the same one twice.
  report = etp_testing.check_rules(prim, *_operands(), checks=['primitive.jit'],
                                   params={'seed': 7}, scale=2.0)
  assert report.passed and report.params == {'seed': 7, 'scale': 2.0}
  with pytest.raises(TypeError, match=r"bind params \['scale'\] given both"):
    etp_testing.check_rules(prim, *_operands(), params={'scale': 1.0},
                            scale=2.0)


def test_reports_are_strict_json():
  # An overflowing case's errors and a NaN param were written as Infinity
  # and NaN, which jq and JavaScript refuse.
  def refuse(constant):
    raise ValueError(f'not JSON: {constant}')
  prim = _negated_matmul_rules(etp.register_primitive(
      _name('nan_param'), _matmul_taking_any_params, batched=True,
      trainable_invars_fn=lambda p: {'weight': 1}))
  report = etp_testing.check_rules(prim, *_operands(), eps=float('nan'),
                                   checks=['xy_to_dw.vjp'])
  data = json.loads(report.to_json(), parse_constant=refuse)
  assert data['params'] == {'eps': 'nan'}
  from etp_testing._src.report import strict_json_data
  assert strict_json_data({'a': [float('inf'), 1.0, (float('nan'),)]}) == {
      'a': ['inf', 1.0, ['nan']]}
  with pytest.raises(ValueError, match='not JSON'):
    json.loads(json.dumps({'e': float('inf')}), parse_constant=refuse)


@pytest.mark.parametrize('dtype', [np.float32, jnp.bfloat16],
                         ids=lambda d: d.__name__)
def test_the_snippet_of_a_non_finite_operand_runs(dtype):
  # The operands error's snippet wrote np.array([nan, ...]).
  x, w = _operands(dtype=dtype)
  x[0, 0], x[1, 1] = np.nan, -np.inf
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.assert_rule_consistent(etp.etp_mm_p, x, w, has_bias=False)
  with pytest.raises(etp_testing.RuleConsistencyError) as again:
    exec(compile(info.value.report.snippet, '<snippet>', 'exec'),
         {'__name__': '__snippet__'})
  assert again.value.report.outcomes[0].reason == (
      info.value.report.outcomes[0].reason)


@pytest.mark.parametrize('x64', [False, True])
def test_the_snippet_turns_x64_on_where_the_run_had_it(x64):
  # A rule wrong only under x64 failed in the run, and its snippet, in a
  # fresh process with x64 off, passed.
  prim = _negated_matmul_rules(etp.register_primitive(
      _name('x64_state'), _matmul_taking_any_params, batched=True,
      trainable_invars_fn=lambda p: {'weight': 1}))
  before = jax.config.jax_enable_x64
  jax.config.update('jax_enable_x64', x64)
  try:
    report = etp_testing.check_rules(prim, *_operands(),
                                     checks=['xy_to_dw.vjp'])
  finally:
    jax.config.update('jax_enable_x64', before)
  assert ("jax.config.update('jax_enable_x64', True)" in report.snippet) == x64


def test_the_report_names_float64_operands():
  jax.config.update('jax_enable_x64', False)
  report = etp_testing.check_rules(
      etp.etp_mm_p, *_operands(dtype=np.float64), checks=['primitive.jit'],
      has_bias=False)
  assert [o['dtype'] for o in report.operands] == ['float64', 'float64']


def test_the_output_shape_is_traced_once_per_operand_avals(monkeypatch):
  """``context.y_aval`` (asked for many times per case) traces the bind once
  per primitive, params, operand avals and x64 setting, and a bind that
  raises is not remembered.  (Counted at the bind y_aval traces, not in the
  impl: JAX caches a primitive's abstract evaluation by itself.)"""
  from etp_testing._src import executor
  from etp_testing._src.context import x64_enabled, y_aval
  binds = []
  real_bind_y = executor.bind_y

  def counting_bind_y(primitive, operands, params):
    binds.append(tuple((o.shape, o.dtype) for o in operands))
    return real_bind_y(primitive, operands, params)

  monkeypatch.setattr(executor, 'bind_y', counting_bind_y)

  def impl(x, w):
    if x.shape[-1] == 5:
      raise ValueError('five is not allowed')
    return x @ w

  prim = etp.register_primitive(_name('y_aval'), impl, batched=True,
                                trainable_invars_fn=dense._trainable)
  x, w = np.ones((2, 3), np.float32), np.ones((3, 4), np.float32)
  for _ in range(3):
    y = y_aval(prim, (x, w), {})
  assert (y.shape, y.dtype) == ((2, 4), np.float32) and len(binds) == 1
  y = y_aval(prim, (x.astype(np.float64), w), {})   # x64 off: float32 again
  assert y.dtype == np.float32 and len(binds) == 1
  with x64_enabled(True):
    y = y_aval(prim, (x.astype(np.float64), w.astype(np.float64)), {})
  assert y.dtype == np.float64 and len(binds) == 2
  y_aval(prim, (np.ones((1, 3), np.float32), w), {})
  assert len(binds) == 3
  for _ in range(2):
    with pytest.raises(ValueError, match='five'):
      y_aval(prim, (np.ones((2, 5), np.float32), np.ones((5, 4), np.float32)),
             {})
  assert len(binds) == 5


@pytest.mark.parametrize('value', [
    np.linspace(-1, 1, 4096 * 3).reshape(4096, 3),           # float64
    np.arange(12, dtype=np.int64).reshape(3, 4),
    np.linspace(0, 1, 6, dtype=np.float32).reshape(2, 3).T,  # not contiguous
    np.array([True, False]), np.float32(2.5), np.zeros((0, 3), np.float32)])
def test_a_host_copy_is_the_device_round_trip_aligned(value):
  """``CheckContext`` copies operands with NumPy: the same dtype, shape and
  values as a round trip through the device, 64-byte aligned (so later
  transfers do not copy), and never the caller's memory."""
  from etp._src.arrays import to_jax
  from etp_testing._src.context import HOST_ALIGNMENT, host_copy
  copy, trip = host_copy(value), np.asarray(to_jax(value))
  assert (copy.dtype, copy.shape) == (trip.dtype, trip.shape)
  np.testing.assert_array_equal(copy, trip)
  if copy.size:
    assert copy.ctypes.data % HOST_ALIGNMENT == 0
    assert not np.shares_memory(copy, value)


def test_a_quantity_operand_is_a_clear_type_error():
  """The unit-aware functions take quantities; a primitive binds mantissas.
  Passing a quantity says so, instead of NumPy's error from the report."""
  import saiunit as u
  x = np.ones(3, np.float32) * u.mV
  w = np.ones((3, 2), np.float32)
  with pytest.raises(TypeError, match=r'operand 0 of etp_mv is a saiunit '
                     r'Quantity.*mantissa'):
    etp_testing.assert_rule_consistent(etp.etp_mv_p, x, w, has_bias=False)
  # A dimensionless quantity would convert, silently: still refused.
  with pytest.raises(TypeError, match='operand 1'):
    etp_testing.check_rules(etp.etp_mv_p, np.ones(3, np.float32),
                            u.Quantity(np.ones((3, 2), np.float32)),
                            has_bias=False)


def test_list_operands_are_checked_as_numpy_reads_them():
  """A Python list is checked as ``np.asarray`` of it (float64), the array
  its report and snippet name; a broken rule still fails on it."""
  from etp_testing._src import mutants
  x, w = [[1.0, 2.0]], [[1.0, 2.0, 3.0], [0.5, 0.25, 2.0]]
  report = etp_testing.check_rules(etp.etp_mm_p, x, w, has_bias=False,
                                   checks=['xy_to_dw.vjp', 'drtrl.exact'])
  assert report.passed, report.failure_message()
  assert [o['dtype'] for o in report.operands] == ['float64', 'float64']
  as_arrays = etp_testing.check_rules(etp.etp_mm_p, np.asarray(x),
                                      np.asarray(w), has_bias=False,
                                      checks=['xy_to_dw.vjp', 'drtrl.exact'])
  assert report.snippet == as_arrays.snippet
  broken = mutants.get('dense_xy_sign').primitive()
  report = etp_testing.check_rules(broken, x, w, has_bias=False,
                                   checks=['xy_to_dw.vjp'])
  assert report.outcome('xy_to_dw.vjp').status == 'failed'


@pytest.mark.parametrize('actual, expected, passed', [
    ([1.0, 2.0], [1.0, 2.0 + 1e-9], True),
    ([1.0, 2.1], [1.0, 2.0], False),
    ([1.0, np.inf], [1.0, np.inf], False),    # equal infinities still fail
    ([1.0, 2.0], [1.0, np.inf], False),
    ([np.nan, 2.0], [1.0, 2.0], False),
    ([np.nan, 2.0], [np.nan, 2.0], False),
])
@pytest.mark.parametrize('use_chex', [True, False])
def test_compare_fails_any_non_finite_value(actual, expected, passed,
                                            use_chex):
  # With or without chex (fast mode's dot products skip it), one verdict.
  from etp_testing._src.context import CheckContext
  ctx = CheckContext(etp.etp_mv_p, (np.ones(2, np.float32),
                                    np.ones((2, 2), np.float32)),
                     {'has_bias': False})
  finding = ctx.compare(np.array(actual), np.array(expected), rule='r',
                        dtype=np.float32, use_chex=use_chex)
  assert finding.passed is passed, finding.describe()


@pytest.mark.parametrize('use_chex', [True, False])
def test_compare_reports_the_share_of_the_bound_the_error_took(use_chex):
  # tolerance_used = max|a - e| / (atol + rtol * scale): at most 1 passes,
  # above 1 fails, on either side of the bound.
  from etp_testing._src.context import CheckContext
  ctx = CheckContext(etp.etp_mv_p, (np.ones(2, np.float32),
                                    np.ones((2, 2), np.float32)),
                     {'has_bias': False}, rtol=1e-3, atol=1e-4)
  expected = np.array([0.5, -2.0])
  bound = 1e-4 + 1e-3 * 2.0
  for share in (0.25, 0.99, 1.01, 4.0):
    finding = ctx.compare(expected + [0.0, share * bound], expected,
                          rule='r', use_chex=use_chex)
    assert finding.passed is (share <= 1), finding.describe()
    assert finding.tolerance_used == pytest.approx(share, rel=1e-9)
    assert finding.scale == 2.0
    assert f'{share:.3g} of the tolerance' in finding.describe()
    assert 'summed terms' not in finding.describe()
  # Two sums of the same terms that cancel: judged against the terms'
  # magnitude (100), which the description names beside the result's (2).
  finding = ctx.compare(expected + [0.0, 0.05], expected, rule='r',
                        term_scale=np.array([100.0]), use_chex=use_chex)
  assert finding.passed and finding.max_rel_err == pytest.approx(0.025)
  assert finding.tolerance_used == pytest.approx(0.05 / (1e-4 + 0.1))
  assert finding.scale == 100.0
  assert "the summed terms' 100, not the result's 2" in finding.describe()
  as_json = json.loads(json.dumps(finding.to_dict()))
  assert as_json['tolerance_used'] == pytest.approx(finding.tolerance_used)


def test_snippet_registers_through_the_module_that_registered(tmp_path):
  # The snippet imported the impl's module: `import functools` for a
  # partial, a library's module for an impl taken from a library, and
  # `import conftest` for tests/conftest.py, which no import finds from
  # where the run ran.  It now imports (or runs) the registering module.
  import functools
  from etp_testing._src import snippet
  prim = etp.register_primitive(_name('partial_impl'),
                                functools.partial(dense._impl),
                                batched=True,
                                trainable_invars_fn=dense._trainable)
  assert snippet._registering_code(prim)[0] == 'import test_harness_robustness'
  conftest = tmp_path / 'tests' / 'conftest.py'
  conftest.parent.mkdir()
  conftest.write_text(textwrap.dedent(f'''
      import etp
      from etp._src import dense
      prim = etp.register_primitive({_name('in_conftest')!r}, dense._impl,
                                    batched=True,
                                    trainable_invars_fn=dense._trainable)
      '''))
  namespace = runpy.run_path(str(conftest), run_name='conftest')
  assert snippet._registering_code(namespace['prim'])[0] == (
      f'import runpy; runpy.run_path({str(conftest)!r})')


def test_snippet_imports_a_module_an_import_finder_knows(monkeypatch):
  # An editable install finds its package with a finder of its own, not a
  # sys.path entry: the snippet must keep `import <module>` there (runpy of
  # the file would break its relative imports), and run a file that no
  # finder knows (etp-check --conftest) from its path.
  import importlib.machinery
  import sys
  from etp_testing._src import snippet

  class EditableFinder:
    @staticmethod
    def find_spec(name, path=None, target=None):
      if name == 'my_editable_layers':
        return importlib.machinery.ModuleSpec(name, None)
      return None
  monkeypatch.setattr(sys, 'meta_path', [EditableFinder(), *sys.meta_path])
  assert snippet._importable('my_editable_layers.dense')
  assert not snippet._importable('etp_conftest_0')
