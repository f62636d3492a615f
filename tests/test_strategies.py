"""Strategies draw valid, varied cases; check_with_hypothesis runs and shrinks.

Draws are checked without running the battery (cheap); the battery runs on
few examples with a few fast checks, since every new shape compiles anew.
"""

import itertools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings

import etp
import etp_testing
from etp._src import dense
from etp_testing import strategies
from etp_testing._src import hypothesis_runner
from etp_testing._src.report import CheckOutcome, Finding

_ids = itertools.count()

FAMILIES = {
    'elemwise': (etp.etp_elemwise_p,),
    'dense': (etp.etp_mv_p, etp.etp_mm_p),
    'sparse': (etp.etp_sp_mv_p, etp.etp_sp_mm_p),
    'conv': (etp.etp_conv_p,),
    'lora': (etp.etp_lora_mv_p, etp.etp_lora_mm_p),
}
BUILTINS = [p for prims in FAMILIES.values() for p in prims]


def draws(strategy, n=150, seed_=0):
  """``n`` draws of ``strategy`` as hypothesis generates them (seeded)."""
  out = []

  @seed(seed_)
  @settings(max_examples=n, database=None, deadline=None,
            suppress_health_check=list(HealthCheck))
  @given(strategy)
  def collect(case):
    out.append(case)
  collect()
  return out


# ------------------------------------------------------------ validity
def test_every_builtin_has_its_family_strategy():
  assert set(strategies.registered_primitives()) >= set(BUILTINS)
  for prim in BUILTINS:
    assert etp_testing.strategy_for(prim) is strategies.strategy_for(prim)
    assert strategies.strategy_for(prim) is not None


@pytest.mark.parametrize('prim', BUILTINS, ids=lambda p: p.name)
def test_builtin_strategy_draws_the_dtypes_asked_for(prim):
  assert strategies.builtin_strategy(prim) is strategies.strategy_for(prim)
  for dtype in ('bfloat16', 'float16'):
    for operands, params in draws(strategies.builtin_strategy(prim, dtype),
                                  n=3):
      prim.bind(*operands, **params)
      assert {o.dtype.name for o in operands
              if np.issubdtype(o.dtype, np.floating) or
              o.dtype.name == 'bfloat16'} == {dtype}


def test_builtin_strategy_is_none_for_other_primitives():
  user = etp.register_primitive('user_prim_for_builtin_strategy',
                                lambda w: w, batched=False,
                                trainable_invars_fn=lambda **_: {'w': 0})
  assert strategies.builtin_strategy(user) is None


@pytest.mark.parametrize('prim', BUILTINS, ids=lambda p: p.name)
def test_draws_bind_with_documented_shapes_dtypes_and_values(prim, x64):
  cases = draws(strategies.strategy_for(prim))
  assert len(cases) >= 100
  for i, (ops, params) in enumerate(cases):
    assert isinstance(ops, tuple) and isinstance(params, dict)
    assert all(isinstance(o, np.ndarray) for o in ops)
    floats = [o for o in ops if np.issubdtype(o.dtype, np.floating)]
    assert {o.dtype.name for o in floats} <= {'float32', 'float64'}
    x = ops[prim.x_invar_index] if prim.x_invar_index is not None else None
    assert len({o.dtype for o in floats if o is not x}) == 1   # x may differ
    for o in floats:   # bounded away from zero and from large values
      assert np.all(np.abs(o) >= 0.25 - 1e-6), prim.name
      assert np.all(np.abs(o) <= 1.5 + 1e-6), prim.name
    out = jax.eval_shape(lambda *o, p=params: prim.bind(*o, **p), *ops)
    _assert_documented_shapes(prim, ops, params, out.shape)
    assert out.dtype == jnp.result_type(*floats)
    if i < 4:   # really bind a few (compiles the impl per shape)
      y = prim.bind(*(jnp.asarray(o) for o in ops), **params)
      assert np.all(np.isfinite(np.asarray(y)))


def _assert_documented_shapes(prim, ops, params, y_shape):
  name = prim.name
  if name == 'etp_elemwise':
    (w,) = ops
    assert params == {} and w.ndim <= 2 and y_shape == w.shape
  elif name in ('etp_mv', 'etp_mm'):
    x, w, *b = ops
    assert x.ndim == (2 if name == 'etp_mm' else 1)
    assert w.shape[0] == x.shape[-1] and len(b) == params['has_bias']
    assert max(w.shape) <= strategies.MAX_DIM
    assert y_shape == x.shape[:-1] + (w.shape[1],)
  elif name in ('etp_sp_mv', 'etp_sp_mm'):
    x, data, idx, *b = ops
    n_in, n_out = params['shape']
    assert x.shape[-1] == n_in and data.shape == (idx.shape[0],)
    assert idx.dtype == np.int32 and idx.shape[1] == 2 and len(idx) >= 1
    assert np.all((idx >= 0) & (idx < np.array([n_in, n_out])))
    assert len({tuple(r) for r in idx}) == len(idx)   # duplicate-free
    assert len(b) == params['has_bias']
    assert y_shape == x.shape[:-1] + (n_out,)
  elif name == 'etp_conv':
    x, k, *b = ops
    assert x.ndim == k.ndim and 3 <= x.ndim <= 5
    assert len(params['window_strides']) == x.ndim - 2
    assert len(b) == params['has_bias']
    assert all(s >= 1 for s in y_shape) and y_shape[0] == x.shape[0]
    hash(tuple(params.items()))   # static params must be hashable
  else:   # lora
    x, lb, la, *b = ops
    assert lb.shape == (x.shape[-1], la.shape[0])
    assert 1 <= la.shape[0] <= strategies.MAX_RANK
    assert len(b) == params['has_bias'] and params['alpha'] != 1.0
    assert y_shape == x.shape[:-1] + (la.shape[1],)


def test_low_precision_dtypes_only_when_asked():
  assert set(draws(strategies.float_dtypes(), 60)) == {'float32', 'float64'}
  assert set(draws(strategies.float_dtypes(allow_low_precision=True),
                   100)) == {'float32', 'float64', 'float16', 'bfloat16'}
  ops, _ = draws(strategies.dense_cases(dtypes='bfloat16'), 1)[0]
  assert {o.dtype.name for o in ops} == {'bfloat16'}


def test_operand_dtypes_mix_one_time_in_three_and_shrink_to_one_dtype():
  pairs = draws(strategies.operand_dtypes(), 300)
  mixed = [x != w for x, w in pairs]
  assert set(pairs) == {(a, b) for a in ('float32', 'float64')
                        for b in ('float32', 'float64')}
  assert 0.1 < np.mean(mixed) < 0.3, np.mean(mixed)   # 1/3 of 1/2
  assert not any(x != w for x, w in draws(
      strategies.operand_dtypes(mixed=False), 100))
  assert set(draws(strategies.operand_dtypes('bfloat16'), 20)) == {
      ('bfloat16', 'bfloat16')}
  from hypothesis import find
  assert find(strategies.operand_dtypes(), lambda _: True) == (
      'float32', 'float32')


def _dtypes_in(ops) -> set:
  return {o.dtype for o in ops if np.issubdtype(o.dtype, np.floating)}


@pytest.mark.parametrize('family', ['dense', 'sparse', 'conv', 'lora'])
def test_families_with_an_input_draw_mixed_precision(family):
  # x in one dtype, the weights (and bias) in another; that every draw
  # binds is test_draws_bind_with_documented_shapes_dtypes_and_values.
  cases = getattr(strategies, f'{family}_cases')
  assert any(len(_dtypes_in(ops)) > 1 for ops, _ in draws(cases(), 100))
  assert all(len(_dtypes_in(ops)) == 1
             for ops, _ in draws(cases(mixed=False), 40))


def test_pieces_respect_their_knobs():
  assert set(draws(strategies.dims(2, 5), 60)) == {2, 3, 5}
  assert set(draws(strategies.dims(4, 4), 5)) == {4}   # no bucket: min
  # A knob raised past a bucket draws the knob's own value too.
  assert set(draws(strategies.dims(1, 4), 80)) == {1, 2, 3, 4}
  assert set(draws(strategies.batch_sizes(4), 80)) == {1, 2, 3, 4}
  assert set(draws(strategies.lora_ranks(4), 80)) == {1, 2, 3, 4}
  with pytest.raises(ValueError, match=r'\[etp_testing\] dims'):
    strategies.dims(3, 2)
  big = draws(strategies.dense_cases(max_dim=16, batched=True), 80)
  assert max(max(c[0][1].shape) for c in big) > strategies.MAX_DIM
  arr = draws(strategies.arrays_of((4, 3), 'float64'), 1)[0]
  assert arr.shape == (4, 3) and arr.dtype == np.float64
  nnz = {len(p) for p in draws(strategies.sparse_patterns(3, 3), 80)}
  assert {1, 9} <= nnz <= {1, 3, 5, 7, 9}
  assert len({len(p) for p in draws(strategies.sparse_patterns(
      3, 3, bucketed=False), 120)}) > 5


# -------------------------------------------------------------- variety
def test_dense_and_lora_variety():
  for strategy in (strategies.dense_cases(), strategies.lora_cases()):
    cases = draws(strategy, 200)
    xs = [c[0][0] for c in cases]
    out_dims = [c[0][-2 if c[1]['has_bias'] else -1].shape[-1] for c in cases]
    in_dims = [x.shape[-1] for x in xs]
    assert any(i != o for i, o in zip(in_dims, out_dims))        # non-square
    assert any(i == o > 1 for i, o in zip(in_dims, out_dims))    # square
    assert any(i == o == 1 for i, o in zip(in_dims, out_dims))   # 1-element
    assert {x.ndim for x in xs} == {1, 2}                        # mv and mm
    assert {x.shape[0] for x in xs if x.ndim == 2} == {1, 2}     # batch 1, >1
    assert {c[1]['has_bias'] for c in cases} == {True, False}
    assert {x.dtype.name for x in xs} == {'float32', 'float64'}
  ranks = {c[0][1].shape[1] for c in draws(strategies.lora_cases(), 100)}
  assert ranks == {1, 2}
  for batched in (True, False):
    assert {c[0][0].ndim for c in draws(
        strategies.dense_cases(batched=batched), 20)} == {2 if batched else 1}


def test_elemwise_variety():
  shapes = {c[0][0].shape for c in draws(strategies.elemwise_cases(), 150)}
  assert () in shapes and (1,) in shapes
  assert any(len(s) == 2 and s[0] != s[1] for s in shapes)


def test_sparse_variety_includes_empty_rows_and_columns():
  cases = draws(strategies.sparse_cases(), 200)
  empty_row = empty_col = full = one = unsorted = False
  for (_, data, idx, *_), params in cases:
    n_in, n_out = params['shape']
    empty_row |= len(set(idx[:, 0])) < n_in
    empty_col |= len(set(idx[:, 1])) < n_out
    full |= len(idx) == n_in * n_out and n_in * n_out > 1
    one |= len(idx) == 1 and n_in * n_out > 1
    flat = idx[:, 0] * n_out + idx[:, 1]
    unsorted |= bool(np.any(np.diff(flat) < 0))
  assert empty_row and empty_col and full and one and unsorted
  assert {c[0][0].ndim for c in cases} == {1, 2}
  assert any(p['shape'][0] != p['shape'][1] for _, p in cases)


def test_conv_variety_covers_every_dimensionality_and_geometry():
  cases = draws(strategies.conv_cases(), 250)
  ranks = {c[0][0].ndim - 2 for c in cases}
  assert ranks == {1, 2, 3}
  params = [p for _, p in cases]
  paddings = {p['padding'] if isinstance(p['padding'], str) else 'explicit'
              for p in params}
  assert paddings == {'SAME', 'VALID', 'SAME_LOWER', 'explicit'}
  assert any(max(p['window_strides']) > 1 for p in params)
  assert any(max(p['rhs_dilation']) > 1 for p in params)
  layouts = {'default' if p['dimension_numbers'] is None else
             'channels-last' if p['dimension_numbers'][0][-1] == 'C' else
             'mixed' for p in params}
  assert layouts == {'default', 'channels-last', 'mixed'}
  assert {c[0][0].shape[0] for c in cases} == {1, 2}          # batch
  assert {p['has_bias'] for p in params} == {True, False}
  for n in (1, 2, 3):   # each dimensionality alone, spatial sizes bounded
    for (x, k, *_), p in draws(strategies.conv_cases(n_spatial=n), 30):
      assert x.ndim == n + 2 and len(p['window_strides']) == n
      assert max(x.shape) <= strategies.MAX_SPATIAL


# ------------------------------------------------------------- registry
def _user_primitive():
  prim = etp.register_primitive(f'user_dense_{next(_ids)}', dense._impl,
                                batched=True, x_invar_index=0,
                                trainable_invars_fn=dense._trainable)
  base = etp.rules_of(etp.etp_mm_p)
  prim.register_etp_rules(yw_to_w=base.yw_to_w, xy_to_dw=base.xy_to_dw,
                          init_drtrl=base.init_drtrl, init_pp=base.init_pp)
  return prim


def test_register_strategy_for_a_user_primitive():
  prim = _user_primitive()
  assert strategies.strategy_for(prim) is None
  first = strategies.dense_cases(batched=True)
  etp_testing.register_strategy(prim, first)
  assert etp_testing.strategy_for(prim) is first
  assert prim in strategies.registered_primitives()
  second = strategies.dense_cases(batched=True, max_dim=2)
  etp_testing.register_strategy(prim, second)    # re-registering replaces
  assert etp_testing.strategy_for(prim) is second
  with pytest.raises(TypeError, match=r'\[etp_testing\].*not an ETP'):
    etp_testing.register_strategy(jax.lax.add_p, first)
  with pytest.raises(TypeError, match=r'\[etp_testing\].*hypothesis strategy'):
    etp_testing.register_strategy(prim, lambda: None)


# ---------------------------------------------------------- fixed cases
@pytest.mark.parametrize('prim', strategies.registered_primitives(),
                         ids=lambda p: p.name)
def test_each_builtin_s_rich_case_is_its_fixed_case_and_rich(prim):
  (case,) = strategies.fixed_cases_for(prim)
  assert case is not None
  operands, params = case
  y = prim.bind(*operands, **params)   # valid for the primitive
  assert all(o.dtype in (np.float32, np.int32) for o in operands)
  if 'has_bias' in params:
    assert params['has_bias'] and len(operands) == len(
        prim.trainable_invars(params)) + 1 + (prim.name.startswith('etp_sp'))
  sizes = [n for o in operands if o.dtype == np.float32 for n in o.shape]
  assert min(sizes) >= 2, sizes
  if prim.batched:
    assert operands[0].shape[0] == strategies.rich_case(prim)[0][0].shape[0]
    assert operands[0].shape[0] >= 3
  if prim.x_invar_index is not None:   # no two output axes of one size
    assert len(set(y.shape)) == y.ndim, y.shape


def _bias_mean_dense():
  """A batched dense layer whose bias gradient is the batch mean: right
  for a batch of one, and wherever no bias is drawn."""
  prim = etp.register_primitive(f'bias_mean_{next(_ids)}', dense._impl,
                                batched=True, x_invar_index=0,
                                trainable_invars_fn=dense._trainable)
  base = etp.rules_of(etp.etp_mm_p)

  def xy_to_dw(x, g, weights, *, has_bias):
    grads = base.xy_to_dw(x, g, weights, has_bias=has_bias)
    if has_bias:
      grads['bias'] = grads['bias'] / x.shape[0]
    return grads
  prim.register_etp_rules(yw_to_w=base.yw_to_w, xy_to_dw=xy_to_dw,
                          init_drtrl=base.init_drtrl, init_pp=base.init_pp)
  return prim


def test_fixed_cases_run_first_and_catch_what_the_draws_miss():
  prim = _bias_mean_dense()
  no_bias = strategies.dense_cases(batched=True, bias=False)
  checks = ['xy_to_dw.vjp']
  etp_testing.register_strategy(prim, no_bias)
  summary = etp_testing.check_with_hypothesis(prim, max_examples=3, seed=0,
                                              checks=checks)
  assert summary.examples == 3   # the draws alone miss it
  etp_testing.register_strategy(
      prim, no_bias, fixed_cases=[strategies.rich_case(etp.etp_mm_p)])
  assert strategies.fixed_cases_for(prim)
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.check_with_hypothesis(prim, max_examples=3, seed=0,
                                      checks=checks)
  message = str(info.value)
  assert 'xy_to_dw[bias]' in message and 'float32[3, 4]' in message
  assert 'This is fixed case 1 of 1 registered with the strategy' in message
  assert 'minimal failing example' not in message
  assert info.value.summary.examples == 0
  # A strategy passed in runs alone: the caller chose every case.
  summary = etp_testing.check_with_hypothesis(prim, max_examples=3, seed=0,
                                              checks=checks, strategy=no_bias)
  assert summary.examples == 3


def test_fixed_cases_count_among_the_examples():
  summary = etp_testing.check_with_hypothesis(
      etp.etp_mm_p, max_examples=1, seed=0, checks=['init.pp'])
  assert summary.examples == 1 and summary.distinct_shapes == 1
  summary = etp_testing.check_with_hypothesis(
      etp.etp_mm_p, max_examples=3, seed=0, checks=['init.pp'])
  assert summary.examples == 3
  # Re-registering replaces the fixed cases too.
  prim = _user_primitive()
  etp_testing.register_strategy(prim, strategies.dense_cases(batched=True),
                                fixed_cases=[strategies.rich_case(
                                    etp.etp_mm_p)])
  etp_testing.register_strategy(prim, strategies.dense_cases(batched=True))
  assert strategies.fixed_cases_for(prim) == ()
  assert strategies.rich_case(prim) is None   # not a built-in


def test_no_strategy_is_a_clear_error():
  prim = _user_primitive()
  with pytest.raises(ValueError, match=r'\[etp_testing\] no strategy '
                     rf'registered for {prim.name}; use '
                     r'etp_testing.register_strategy'):
    etp_testing.check_with_hypothesis(prim)
  with pytest.raises(ValueError, match='no check matches'):
    etp_testing.check_with_hypothesis(etp.etp_mm_p, checks=['nope'])


# ------------------------------------------------------ summary records
def _outcome(status, rel=None, reason='', used=None, approximate=False):
  findings = [] if rel is None else [Finding(
      rule='r', max_abs_err=rel, max_rel_err=rel, tolerance_used=used,
      approximate=approximate)]
  return CheckOutcome(name='c', status=status, findings=findings,
                      reason=reason, duration_s=0.5)


def test_check_summary_aggregates_statuses():
  s = hypothesis_runner.CheckSummary('c')
  s.add(_outcome('skipped', reason='no gpu'), 0)
  s.add(_outcome('skipped', reason='no gpu'), 1)
  assert s.status == 'skipped' and s.skip_reasons == ['no gpu']
  s.add(_outcome('passed', rel=1e-7), 2)
  s.add(_outcome('passed', rel=3e-7), 3)
  assert s.status == 'passed' and s.skipped == 2 and s.examples == 4
  assert (s.max_rel_err, s.worst_example) == (3e-7, 3)
  s.add(_outcome('measured', rel=1e-2), 4)
  s.add(_outcome('passed', rel=1e-8), 5)
  assert s.status == 'measured' and s.worst_example == 4
  assert s.statuses == {'skipped': 2, 'passed': 3, 'measured': 1}
  assert json.loads(json.dumps(s.to_dict()))['duration_s'] == 3.0


def test_check_summary_keeps_the_comparison_closest_to_its_bound():
  # Not the largest relative error: a cancelling sum's can be large and
  # far inside its bound.  Measured (approximate) keys are not judged.
  s = hypothesis_runner.CheckSummary('c')
  s.add(_outcome('passed', rel=3e-5, used=0.01), 0)
  s.add(_outcome('passed', rel=1e-6, used=0.4), 1)
  s.add(_outcome('measured', rel=1e-2, used=50.0, approximate=True), 2)
  s.add(_outcome('passed', rel=1e-7, used=0.1), 3)
  assert (s.tolerance_used, s.tightest_example) == (0.4, 1)
  assert (s.max_rel_err, s.worst_example) == (1e-2, 2)
  assert json.loads(json.dumps(s.to_dict()))['tolerance_used'] == 0.4


def test_a_failure_without_numbers_is_not_given_a_passing_key_s_error():
  # xy_to_dw's weight gradient comes transposed (a shape failure, no
  # numbers); the bias's is right (error 0).  The check's worst error is
  # the failure's, which has none: not the bias's 0 ("FAIL 0").
  def xy_to_dw(x, g, weights, *, has_bias):
    out = dense._xy_to_dw(x, g, weights, has_bias=has_bias)
    return {**out, 'weight': out['weight'].T}
  prim = _dense_with('transposed_dense', xy_to_dw)
  x, w, b = (np.ones(s, np.float32) for s in ((2, 3), (3, 2), (2,)))
  outcome = etp_testing.check_rules(prim, x, w, b, checks='xy_to_dw.vjp',
                                    has_bias=True).outcome('xy_to_dw.vjp')
  assert outcome.status == 'failed'
  assert any(f.passed and f.max_rel_err == 0 for f in outcome.findings)
  assert outcome.worst() is None
  fd = etp_testing.check_rules(prim, x, w, b, checks='xy_to_dw.fd',
                               has_bias=True).outcome('xy_to_dw.fd')
  shape_failure = [f.describe() for f in fd.findings if not f.passed]
  assert any("for 'weight', a weight of shape (3, 2)" in d
             for d in shape_failure), shape_failure
  assert not any('dtype None' in d for d in shape_failure)
  from etp_testing._src import matrix
  assert matrix.cell(outcome.status, None) == 'FAIL'
  # A failure with numbers keeps them.
  failing = CheckOutcome('c', 'failed', [
      Finding(rule='r', max_rel_err=0.0, max_abs_err=0.0),
      Finding(rule='r', passed=False, max_rel_err=0.5, max_abs_err=1.0)])
  assert failing.worst().max_rel_err == 0.5


# ------------------------------------------------- check_with_hypothesis
def test_correct_dense_passes_with_a_summary():
  summary = etp_testing.check_with_hypothesis(
      etp.etp_mm_p, max_examples=4, seed=1,
      checks=['xy_to_dw.vjp', 'init.drtrl', 'drtrl.instant'])
  assert isinstance(summary, etp_testing.HypothesisSummary)
  assert summary.passed and summary.examples == 4 and summary.seed == 1
  assert 1 <= summary.distinct_shapes <= 4
  vjp = summary.checks['xy_to_dw.vjp']
  assert isinstance(vjp, etp_testing.CheckSummary)
  assert vjp.status == 'passed' and vjp.examples == 4
  assert vjp.max_rel_err is not None and vjp.max_rel_err < 1e-5
  instant = summary.checks['drtrl.instant']   # dense has no instant rule
  assert instant.status == 'skipped' and instant.skipped == 4
  assert instant.skip_reasons
  d = json.loads(json.dumps(summary.to_dict()))
  assert d['primitive'] == 'etp_mm' and d['examples'] == 4
  assert list(d['checks']) == ['xy_to_dw.vjp', 'init.drtrl', 'drtrl.instant']
  # Printed: a line for the run, one per check.
  lines = str(summary).splitlines()
  assert lines[0].startswith('etp_mm: passed over 4 examples (seed 1, ')
  assert [line.split()[:2] for line in lines[1:]] == [
      ['xy_to_dw.vjp', 'passed'], ['init.drtrl', 'passed'],
      ['drtrl.instant', 'skipped']], lines
  assert 'max rel err' in lines[1] and 'of the bound' in lines[1]
  assert '4 skipped' in lines[3] and instant.skip_reasons[0] in lines[3]


def test_correct_dense_passes_drtrl_exact():
  # One shape (in = out = 1 is still a full D-RTRL run): one compilation.
  small = strategies.dense_cases(batched=False, max_dim=1, dtypes='float32',
                                 bias=True)
  summary = etp_testing.check_with_hypothesis(
      etp.etp_mv_p, strategy=small, max_examples=3, seed=0, steps=2,
      n_state=2, checks=['xy_to_dw.vjp', 'drtrl.exact'])
  assert summary.passed and summary.distinct_shapes == 1
  assert summary.checks['drtrl.exact'].status == 'passed'


def test_same_seed_same_draws_and_settings_are_merged():
  seen = {0: [], 1: []}

  def recording(run):
    return strategies.elemwise_cases().map(
        lambda c: seen[run].append(c[0][0].tobytes()) or c)
  for run in (0, 1):
    etp_testing.check_with_hypothesis(
        etp.etp_elemwise_p, strategy=recording(run), seed=7,
        checks=['primitive.abstract_eval'], max_examples=None,
        settings=settings(max_examples=3, database=None))
  assert len(seen[0]) == 3 and seen[0] == seen[1]


def test_a_run_with_the_same_draws_replays_them_without_hypothesis():
  drawn = []
  strategy = strategies.elemwise_cases().map(lambda c: drawn.append(c) or c)
  run = lambda check, seed_=11: etp_testing.check_with_hypothesis(
      etp.etp_elemwise_p, strategy=strategy, seed=seed_, max_examples=3,
      checks=[check])
  first = run('primitive.abstract_eval')
  assert len(drawn) == 3
  second = run('primitive.jit')     # the plugin's next check, same draws
  assert len(drawn) == 3
  assert second.passed and second.checks['primitive.jit'].examples == 3
  assert (second.examples, second.distinct_shapes) == (
      first.examples, first.distinct_shapes)
  run('primitive.jit', seed_=12)    # other draws: hypothesis draws them
  assert len(drawn) == 6


def test_a_replayed_case_that_fails_is_shrunk_by_hypothesis():
  # The first run passes (its check does not look at xy_to_dw) and keeps
  # its cases; the second replays them, one fails, and hypothesis draws
  # them again and shrinks: the same minimal case and message as a run
  # with nothing kept.
  prim = _broken_when_non_square()
  strategy = strategies.dense_cases(batched=True)
  run = lambda check: etp_testing.check_with_hypothesis(
      prim, strategy=strategy, max_examples=15, seed=3, checks=[check])
  errors = []
  for keep_first in (True, False):
    hypothesis_runner._DRAWN.clear()
    if keep_first:
      assert run('primitive.abstract_eval').passed
      assert hypothesis_runner._DRAWN
    with pytest.raises(etp_testing.RuleConsistencyError) as info:
      run('xy_to_dw.vjp')
    errors.append(info.value)
  replayed, fresh = errors
  assert replayed.report.operands == fresh.report.operands
  assert replayed.report.params == fresh.report.params
  after = lambda e: re.search(r'after \d+ runs of the battery \(\d+ passed',
                              str(e)).group(0)
  assert after(replayed) == after(fresh)
  assert replayed.summary.examples == fresh.summary.examples


@pytest.mark.parametrize('broken', [True, False])
def test_a_replayed_failure_stands_where_hypothesis_draws_otherwise(broken):
  # A strategy whose values do not follow from hypothesis's draws alone
  # (here a switch; in the wild its own random numbers or a counter): the
  # first run keeps non-square cases, the second replays them and one
  # fails, and hypothesis, drawing again, gets square ones, which pass.
  # That was reported as a pass.
  from hypothesis import strategies as st
  square = [False]

  @st.composite
  def cases(draw):
    n_in = draw(st.integers(2, 3))
    n_out = n_in if square[0] else n_in + 1
    x = np.linspace(-1, 1, 2 * n_in, dtype=np.float32).reshape(2, n_in)
    w = np.linspace(-1, 1, n_in * n_out, dtype=np.float32).reshape(n_in,
                                                                   n_out)
    return (x, w), {'has_bias': False}
  prim = (_broken_when_non_square() if broken
          else _dense_doubled_when(lambda n_in, n_out: False))
  strategy = cases()
  run = lambda check: etp_testing.check_with_hypothesis(
      prim, strategy=strategy, max_examples=3, seed=5, checks=[check])
  hypothesis_runner._DRAWN.clear()
  assert run('primitive.abstract_eval').passed
  square[0] = True
  if not broken:
    assert run('xy_to_dw.vjp').passed
    return
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    run('xy_to_dw.vjp')
  assert 'did not draw it' in str(info.value)
  n_in, n_out = info.value.report.operands[1]['shape']
  assert n_in != n_out


def test_draws_are_kept_only_where_they_repeat():
  strategy = strategies.elemwise_cases()
  base = settings(max_examples=3, database=None, derandomize=False)
  key = hypothesis_runner._draws_key
  assert key(strategy, 5, base) is not None
  assert key(strategy, None, base) is None          # a random seed
  assert key(strategy, None, settings(base, derandomize=True)) is not None
  from hypothesis.database import InMemoryExampleDatabase
  assert key(strategy, 5, settings(base, database=InMemoryExampleDatabase())
             ) is None                               # saved examples first
  class Unhashable(type(strategy)):
    __hash__ = None
  unhashable = Unhashable.__new__(Unhashable)
  assert key(unhashable, 5, base) is None
  case = ((np.ones(2, np.float32),), {})
  copy = hypothesis_runner._copied(case)
  assert copy[0][0] is not case[0][0]
  np.testing.assert_array_equal(copy[0][0], case[0][0])


def _broken_when_non_square():
  """Dense, but xy_to_dw's weight gradient is doubled when in != out."""
  return _dense_doubled_when(lambda n_in, n_out: n_in != n_out)


def _dense_doubled_when(doubled):
  """Dense, but xy_to_dw's weight gradient is doubled where
  ``doubled(n_in, n_out)``."""
  def xy_to_dw(x, g, weights, *, has_bias):
    out = dense._xy_to_dw(x, g, weights, has_bias=has_bias)
    if doubled(*weights['weight'].shape):
      out['weight'] = 2 * out['weight']
    return out
  return _dense_with('doubled_dense', xy_to_dw)


def _dense_with(name, xy_to_dw):
  """A batched dense primitive (a new one named ``name_<n>``) with
  ``xy_to_dw`` and etp_mm's other rules."""
  prim = etp.register_primitive(f'{name}_{next(_ids)}', dense._impl,
                                batched=True, x_invar_index=0,
                                trainable_invars_fn=dense._trainable)
  base = etp.rules_of(etp.etp_mm_p)
  prim.register_etp_rules(yw_to_w=base.yw_to_w, xy_to_dw=xy_to_dw,
                          init_drtrl=base.init_drtrl, init_pp=base.init_pp)
  return prim


@pytest.mark.parametrize('seed', [1, 8])
def test_the_first_example_has_a_batch_where_a_missing_sum_shows(seed):
  # Hypothesis's first example is the one every piece shrinks to.  With a
  # batch of one there, a mean over the batch instead of a sum passed the
  # first example (and, with these seeds, the battery's 3 examples); batch
  # sizes shrink to 2, so one example catches it and the correct layer
  # passes it.
  from etp_testing import mutants
  mean = mutants.get('dense_batch_mean')
  run = lambda prim: etp_testing.check_with_hypothesis(
      prim, max_examples=1, seed=seed, checks=['xy_to_dw.vjp'],
      strategy=strategies.strategy_for(etp.etp_mm_p))
  try:
    with pytest.raises(etp_testing.RuleConsistencyError) as info:
      run(mean.primitive())
  finally:
    mutants.forget_built()
  assert info.value.report.operands[0]['shape'][0] == 2
  assert run(etp.etp_mm_p).passed


def test_broken_dense_is_caught_and_shrunk_to_a_minimal_case():
  prim = _broken_when_non_square()
  etp_testing.register_strategy(prim, strategies.dense_cases(batched=True))
  with pytest.raises(etp_testing.RuleConsistencyError) as info:
    etp_testing.check_with_hypothesis(prim, max_examples=15, seed=3,
                                      checks=['xy_to_dw.vjp'])
  err = info.value
  report = err.report
  assert not report.passed
  assert report.outcome('xy_to_dw.vjp').status == 'failed'
  failing = [f for f in report.outcome('xy_to_dw.vjp').findings
             if not f.passed]
  assert failing and failing[0].rule == 'xy_to_dw'
  assert failing[0].key == 'weight'
  # Shrunk: the smallest non-square weight, batch 2 (batch_sizes shrinks
  # to it), no bias, float32.
  shapes = [tuple(o['shape']) for o in report.operands]
  assert shapes[1] in ((1, 2), (2, 1)), shapes
  assert shapes[0][0] == 2 and len(shapes) == 2
  assert report.params == {'has_bias': False}
  assert {o['dtype'] for o in report.operands} == {'float32'}
  message = str(err)
  assert 'minimal failing example found by hypothesis after' in message
  assert 'seed=3' in message and '@reproduce_failure(' in message
  assert 'Reproduce with' in message
  assert err.summary.primitive == prim.name


@pytest.mark.parametrize('mixed', [True, False])
def test_mixed_precision_draws_catch_a_rule_that_rounds_g_to_x_dtype(mixed):
  # The mutant rounds g to x's dtype: values, not dtypes, are wrong (the
  # check's traces in other dtypes see nothing), and only where x is the
  # narrower, so only a drawn float32 x over float64 weights catches it,
  # and the shrunk case is one.
  from etp_testing import mutants
  prim = mutants.get('dense_xy_g_in_x_dtype').primitive()
  run = lambda: etp_testing.check_with_hypothesis(
      prim, max_examples=100, seed=0, checks=['xy_to_dw.vjp'],
      strategy=strategies.dense_cases(batched=True, mixed=mixed))
  try:
    if not mixed:
      assert run().status == 'passed'
      return
    with pytest.raises(etp_testing.RuleConsistencyError) as info:
      run()
  finally:
    mutants.forget_built()   # unregistered again
  dtypes = [o['dtype'] for o in info.value.report.operands]
  assert dtypes[:2] == ['float32', 'float64'], dtypes
  assert info.value.report.outcome('xy_to_dw.vjp').status == 'failed'


def test_a_failing_run_shrinks_without_hypothesis_explain_phase():
  # With no passing example seen (a rule wrong on every case), the explain
  # phase re-ran the failing battery about 100 more times, each varied shape
  # compiling, for notes the harness's error does not show.
  prim = _dense_doubled_when(lambda n_in, n_out: True)
  etp_testing.register_strategy(prim, strategies.dense_cases(batched=True))
  for settings_given in (None, settings(database=None)):
    with pytest.raises(etp_testing.RuleConsistencyError) as info:
      etp_testing.check_with_hypothesis(prim, max_examples=15, seed=3,
                                        checks=['xy_to_dw.vjp'],
                                        settings=settings_given)
    calls = int(re.search(r'found by hypothesis after (\d+) runs',
                          str(info.value)).group(1))
    assert calls < 40, calls


def test_a_derandomized_failure_says_how_it_replays():
  # Under hypothesis's ci profile (loaded when CI is set) there is no seed to
  # report; the message says a rerun draws the same examples instead.
  prim = _dense_doubled_when(lambda n_in, n_out: True)
  etp_testing.register_strategy(prim, strategies.dense_cases(batched=True))
  messages = []
  for _ in range(2):
    with pytest.raises(etp_testing.RuleConsistencyError) as info:
      etp_testing.check_with_hypothesis(
          prim, max_examples=5, checks=['xy_to_dw.vjp'],
          settings=settings(database=None, derandomize=True))
    messages.append(str(info.value))
  assert messages[0] == messages[1]
  replay, = [l for l in messages[0].splitlines()
             if l.startswith('This is the minimal failing example')]
  assert info.value.summary.seed is None and 'seed=' not in replay
  assert 'derandomized' in replay and 'replays the same draws' in replay
