"""The false-alarm soak (``scripts/soak.py``).

The full soak (10,000 generated examples of the correct built-ins, float32
and float64, several seeds) is marked ``soak``; the root ``conftest.py``
deselects it unless the ``nightly`` hypothesis profile is chosen or ``-m``
names it (``pytest -m soak``).  A tiny smoke
run keeps the script exercised in CI, and a broken primitive shows that the
soak does report failures.
"""

import importlib.util
import json
import pathlib

import pytest

from etp_testing import mutants

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_soak():
  spec = importlib.util.spec_from_file_location('etp_soak_script',
                                                ROOT / 'scripts' / 'soak.py')
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


soak = _load_soak()


@pytest.fixture
def _forget_mutants():
  yield
  mutants.forget_built()


def test_plan_splits_examples_evenly():
  assert soak._plan(10, 4) == [3, 3, 2, 2]
  assert sum(soak._plan(10_000, 3 * 8 * 2)) == 10_000
  assert soak._plan(2, 4) == [1, 1, 0, 0]


def test_smoke(tmp_path, capsys):
  path = tmp_path / 'soak.json'
  code = soak.main(['--examples', '4', '--primitives', 'etp_elemwise',
                    '--seeds', '0', '--quiet', '--json', str(path)])
  out = capsys.readouterr().out
  assert code == 0, out
  assert 'examples: 4 (requested 4), failures: 0' in out
  assert 'Worst error per check' in out and 'drtrl.exact' in out
  data = json.loads(path.read_text())
  assert data['examples'] == 4 and not data['failures']
  assert {r['dtype'] for r in data['runs']} == {'float32', 'float64'}
  assert data['worst']['xy_to_dw.vjp']['examples'] == 4
  # The margin to a false alarm: a share of the bound, well under 1 here.
  used = data['worst']['xy_to_dw.vjp']['tolerance_used']
  assert used is not None and 0 <= used < 1
  assert 'of tol' in out and 'closest to its tolerance: ' in out


def test_fast_smoke(capsys):
  # --fast: the random projections on generated shapes, not the Jacobian.
  code = soak.main(['--examples', '4', '--primitives', 'etp_mm', '--seeds',
                    '0', '--checks', 'xy_to_dw.jacrev', '--fast', '--quiet'])
  out = capsys.readouterr().out
  assert code == 0, out
  assert 'examples: 4 (requested 4), fast mode, failures: 0' in out


@pytest.mark.usefixtures('_forget_mutants')
@pytest.mark.parametrize('check, fast', [('xy_to_dw.vjp', []),
                                         ('xy_to_dw.jacrev', ['--fast'])])
def test_soak_reports_a_failure(capsys, check, fast):
  code = soak.main(['--examples', '2', '--primitives',
                    'mutant_elemwise_xy_sign', '--dtypes', 'float64',
                    '--seeds', '0', '--checks', check, '--quiet', *fast])
  out = capsys.readouterr().out
  assert code == 1
  assert 'FAILURE mutant_elemwise_xy_sign float64 seed 0' in out
  assert 'failures: 1' in out
  # A fast-mode failure says so, and its snippet re-runs it in fast mode.
  assert ('fast mode' in out) == bool(fast)
  assert ('fast=True' in out) == bool(fast)


def test_an_interrupted_soak_keeps_what_finished(tmp_path, capsys,
                                                 monkeypatch):
  """Ctrl-C (here: raised after the first run) ends the soak with the runs
  that finished, marked interrupted, and exit status 2."""
  real_run_all = soak._run_all

  def stop_after_first_run(runs, plan, *rest):
    *front, log = rest
    def log_then_stop(line):
      log(line)
      raise KeyboardInterrupt
    return real_run_all(runs, plan, *front, log_then_stop)
  monkeypatch.setattr(soak, '_run_all', stop_after_first_run)
  path = tmp_path / 'soak.json'
  code = soak.main(['--examples', '4', '--primitives', 'etp_elemwise',
                    '--seeds', '0', '--checks', 'init.drtrl', '--json',
                    str(path)])
  out = capsys.readouterr().out
  assert code == 2, out
  assert 'examples: 2 (requested 4), failures: 0' in out
  assert 'INTERRUPTED' in out
  data = json.loads(path.read_text())
  assert data['interrupted'] and data['examples'] == 2
  assert len(data['runs']) == 1


@pytest.mark.usefixtures('_forget_mutants')
def test_half_precision_is_drawn_not_filtered(capsys):
  # The built-ins' default strategies draw float32 and float64 only; the
  # soak asks their families for half precision (a filter of the defaults
  # was unsatisfiable), and still reports a broken rule there.
  code = soak.main(['--examples', '4', '--primitives', 'etp_mv', '--dtypes',
                    'float16,bfloat16', '--seeds', '0', '--checks',
                    'xy_to_dw.vjp', '--quiet'])
  out = capsys.readouterr().out
  assert code == 0, out
  assert 'examples: 4 (requested 4), failures: 0' in out
  code = soak.main(['--examples', '2', '--primitives',
                    'mutant_elemwise_xy_sign', '--dtypes', 'bfloat16',
                    '--seeds', '0', '--checks', 'xy_to_dw.vjp', '--quiet'])
  out = capsys.readouterr().out
  assert code == 1 and 'FAILURE mutant_elemwise_xy_sign bfloat16' in out


@pytest.mark.usefixtures('_forget_mutants')
@pytest.mark.parametrize('dtypes', ['float32,float64', 'float32'])
def test_the_soak_draws_mixed_precision(capsys, dtypes):
  # A run's dtype is its weights'; the built-ins' x is now and then in
  # another of --dtypes.  A rule that rounds g to x's dtype is right while
  # they agree: only mixed cases catch it.
  code = soak.main(['--examples', '80', '--primitives',
                    'mutant_dense_xy_g_in_x_dtype', '--dtypes', dtypes,
                    '--seeds', '0', '--checks', 'xy_to_dw.vjp', '--quiet'])
  out = capsys.readouterr().out
  if dtypes == 'float32':
    assert code == 0, out
  else:
    assert code == 1 and 'FAILURE mutant_dense_xy_g_in_x_dtype' in out, out


def test_a_registered_strategy_is_filtered_by_dtype(monkeypatch):
  # A strategy the user registered for a built-in replaces its family: the
  # soak keeps to it, taking its draws of each dtype.
  import jax.numpy as jnp
  import numpy as np
  from hypothesis import errors, find, strategies as st
  import etp
  from etp_testing._src import strategies
  ones = ((np.ones(3, np.float64),), {})
  monkeypatch.setitem(strategies._STRATEGIES, etp.etp_elemwise_p,
                      st.just(ones))
  draw = soak._drawer(etp.etp_elemwise_p)
  assert find(draw('float64'), lambda case: True) is ones
  with pytest.raises((errors.Unsatisfiable, errors.NoSuchExample)):
    find(draw('float32'), lambda case: True)   # it draws no float32
  halves = ((np.ones(3, jnp.bfloat16),), {})   # no np.floating to NumPy
  monkeypatch.setitem(strategies._STRATEGIES, etp.etp_elemwise_p,
                      st.just(halves))
  draw = soak._drawer(etp.etp_elemwise_p, ('bfloat16',))
  assert find(draw('bfloat16'), lambda case: True) is halves
  monkeypatch.undo()   # the family again, drawing the dtypes asked for
  draw = soak._drawer(etp.etp_elemwise_p, ('float32', 'bfloat16'))
  (weight,), _ = find(draw('bfloat16'), lambda case: True)
  assert weight.dtype.name == 'bfloat16'


def test_unknown_primitive():
  with pytest.raises(SystemExit, match='no primitive with a strategy'):
    soak.main(['--examples', '1', '--primitives', 'no_such_primitive'])


@pytest.mark.soak
def test_soak_10000_examples():
  """The nightly soak: no false alarm in 10,000 examples."""
  assert soak.main(['--examples', '10000', '--seeds', '0,1,2']) == 0
