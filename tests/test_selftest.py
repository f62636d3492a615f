"""The harness kills every mutant: the selftest in its reduced form.

Every mutant of ``etp_testing.mutants`` runs through ``check_rules`` with its
expected checks plus a cheap subset (``selftest.checks_for(m, reduced=True)``,
``steps=2``); each must be killed by a check that names the real cause, and
the correct built-in it was made from must pass the same checks on the same
case.  A change that blinds a check makes its mutants survive and fails here.
"""

import json
import re
import subprocess
import sys

import pytest

import etp
from etp_testing import check_names
from etp_testing import mutants
from etp_testing import selftest
from etp_testing._src import compilations
from etp_testing._src import mutants as mutants_src

FAMILIES = ('dense', 'sparse', 'elemwise', 'conv', 'lora')

# The bug classes the catalog must cover (the list).
REQUIRED_CLASSES = (
    'wrong_axis', 'passthrough', 'missing_factor', 'sign', 'scale',
    'transposed', 'dropped_key', 'extra_key', 'init_dtype', 'state_axis',
    'nonzero_init', 'batch_not_summed', 'vmap', 'weight_shaped_trace',
    'bias_axis', 'jvp', 'batcher', 'jit', 'int_tangent', 'float64_only',
    'batch_one_only',
)


@pytest.fixture(autouse=True)
def _forget_mutants():
  # Every test leaves etp.primitives() as found: no broken primitive is
  # listed while other tests (or plugins) look at the registry.
  yield
  mutants.forget_built()


def _ids(ms):
  return [m.name[len('mutant_'):] for m in ms]


CATALOG = mutants.catalog()


class TestCatalog:

  def test_size_and_spread(self):
    assert len(CATALOG) >= 40
    assert set(FAMILIES) <= {m.family for m in CATALOG}
    missing = set(REQUIRED_CLASSES) - {m.bug_class for m in CATALOG}
    assert not missing, f'bug classes without a mutant: {sorted(missing)}'

  def test_records_are_well_formed(self):
    names = [m.name for m in CATALOG]
    assert len(set(names)) == len(names)
    known = check_names()
    for m in CATALOG:
      assert m.name.startswith('mutant_' + m.family + '_')
      assert m.description and '\n' not in m.description
      assert m.expected_checks and isinstance(m.expected_checks, tuple)
      for pattern in m.expected_checks:
        assert any(m.matches(c) for c in known), (m.name, pattern)
      assert callable(m.case) and callable(m.build)
      assert etp.is_etp_primitive(m.base_primitive())

  def test_lookup(self):
    m = CATALOG[0]
    assert mutants.get(m.name) is m
    assert mutants.get(m.name[len('mutant_'):]) is m
    assert mutants.catalog(pattern='dense_*') == mutants.catalog('dense')
    with pytest.raises(KeyError, match=r'\[etp_testing\] no mutant'):
      mutants.get('no_such_mutant')

  def test_import_registers_nothing(self):
    code = ('import etp, etp_testing, etp_testing.mutants as m, '
            'etp_testing.selftest\n'
            'assert len(m.catalog()) >= 40\n'
            "names = [p.name for p in etp.primitives()]\n"
            "assert not [n for n in names if n.startswith('mutant_')], names\n"
            'p = m.catalog()[0].primitive()\n'
            'assert p in etp.primitives() and m.catalog()[0].primitive() is p\n'
            'assert m.forget_built() == 1 and p not in etp.primitives()\n')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]


@pytest.mark.parametrize('fast', [None, True], ids=['auto', 'fast-mode'])
@pytest.mark.parametrize('mutant', CATALOG, ids=_ids(CATALOG))
def test_mutant_is_killed(mutant, fast):
  """Every mutant is killed, in the default mode and in fast mode (random
  projections, sampled anchors): fast mode must kill what full mode kills."""
  result = selftest.run_mutant(mutant, reduced=True, fast=fast)
  assert result.verdict == selftest.KILLED, (
      f'{mutant.name} ({mutant.description}) was not killed '
      f'(fast={fast}): verdict {result.verdict}; expected '
      f'{mutant.expected_checks}; statuses {result.statuses}; reasons '
      f'{result.reasons}')


BUILTIN_CASES = selftest.builtin_cases(CATALOG, reduced=True)


@pytest.mark.parametrize('case', BUILTIN_CASES,
                         ids=[c.base + '-' + c.mutants[0][len('mutant_'):]
                              for c in BUILTIN_CASES])
@pytest.mark.parametrize('fast', [None, True], ids=['auto', 'fast-mode'])
def test_builtin_passes_on_mutant_cases(case, fast):
  """No false alarm: the correct built-in passes every check its mutants ran,
  on their very case, in the default mode and in fast mode."""
  result = selftest.run_builtin(mutants.builtin(case.base), case.operands,
                                case.params, checks=case.checks,
                                case_of=case.label, steps=2, fast=fast)
  assert result.passed, (f'false alarm: {result.primitive} on the case of '
                         f'{case.mutants}: {result.reasons}')


class TestVerdicts:

  def test_verdict_rules(self):
    v = selftest._verdict
    assert v({'a.x': 'failed', 'b.y': 'passed'}, ('a.*',)) == selftest.KILLED
    assert v({'a.x': 'passed', 'b.y': 'failed'}, ('a.*',)) == \
        selftest.MISATTRIBUTED
    assert v({'a.x': 'error', 'b.y': 'passed'}, ('a.*',)) == selftest.CRASHED
    assert v({'a.x': 'passed', 'b.y': 'skipped'}, ('a.*',)) == \
        selftest.SURVIVED

  def test_checks_for_fast_covers_expected(self):
    for m in CATALOG:
      reduced = selftest.checks_for(m, reduced=True)
      assert any(m.matches(c) for c in reduced)
      assert set(selftest.CHEAP_CHECKS) & set(check_names()) <= set(reduced)
    assert selftest.checks_for(CATALOG[0]) == list(check_names())

  def test_builtin_cases_cover_every_mutant(self):
    covered = [n for c in BUILTIN_CASES for n in c.mutants]
    assert sorted(covered) == sorted(m.name for m in CATALOG)
    for c in BUILTIN_CASES:
      for name in c.mutants:
        assert set(selftest.checks_for(mutants.get(name), reduced=True)) <= \
            set(c.checks)


class TestMain:

  def test_cli_kill_matrix_and_json(self, tmp_path, capsys):
    path = tmp_path / 'out.json'
    code = selftest.main(['--mutants', 'dense_xy_sign', '--reduced', '--quiet',
                          '--json', str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.rstrip().splitlines()[-1] == '1/1 mutants killed'
    assert 'mutant_dense_xy_sign' in out and ' K ' in out
    data = json.loads(path.read_text())
    assert data['killed'] == data['total'] == 1 and data['ok']
    assert data['mutants'][0]['verdict'] == 'killed'
    assert data['builtins'] and data['builtins'][0]['passed']

  def test_cli_hypothesis_examples(self, tmp_path, capsys):
    # --examples: generated cases for the mutant (drawn by its built-in's
    # strategy) and for the built-in itself.
    path = tmp_path / 'out.json'
    code = selftest.main(['--mutants', 'elemwise_xy_sign', '--reduced',
                          '--examples', '2', '--quiet', '--json', str(path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert '[hypothesis: killed]' in out
    data = json.loads(path.read_text())
    assert data['mutants'][0]['hypothesis']['verdict'] == 'killed'
    generated = [b for b in data['builtins'] if b['case_of'] == 'hypothesis']
    assert generated and generated[0]['passed']
    assert generated[0]['examples'] == 2

  def test_cli_fails_on_a_survivor(self, monkeypatch, capsys):
    # A "mutant" that is an exact copy of the correct etp_mv: nothing can
    # kill it, so the selftest must exit non-zero and say so.
    real = mutants.get('dense_xy_sign')
    name = 'mutant_dense_not_broken'
    fake = mutants_src.Mutant(
        name=name, family='dense', description='nothing wrong',
        expected_checks=('xy_to_dw.*',), case=real.case,
        build=lambda: mutants_src._clone(name, 'etp_mv'), bug_class='none',
        base='etp_mv')
    monkeypatch.setattr(mutants_src, '_CATALOG',
                        mutants_src._CATALOG + [fake])
    code = selftest.main(['--mutants', 'dense_not_broken', '--reduced',
                          '--quiet', '--no-builtins'])
    out = capsys.readouterr().out
    assert code == 1
    assert out.rstrip().splitlines()[-1] == '0/1 mutants killed'
    assert 'survived' in out
    assert name not in [p.name for p in etp.primitives()]  # run() forgot it

  def test_cli_unknown_glob(self, capsys):
    assert selftest.main(['--mutants', 'no_such_*']) == 2
    # A usage error, named by the command as its other usage errors are.
    assert capsys.readouterr().err == (
        "python -m etp_testing.selftest: no mutant matches 'no_such_*'\n")

  def test_cli_compile_cache_is_written_then_loaded(self, tmp_path, capsys,
                                                    no_xla_cache):
    # no_xla_cache: the suite's own cache would win over --compile-cache
    # (a JAX cache already configured wins), and is restored after.
    cache = tmp_path / 'xla'
    args = ['--mutants', 'dense_xy_sign', '--reduced', '--quiet',
            '--no-builtins', '--compile-cache', str(cache)]
    lines = []
    for _ in range(2):
      compilations.release()   # nothing in memory: each run asks the disk
      assert selftest.main(args) == 0
      lines.append(capsys.readouterr().out.rstrip().splitlines()[-3])
    first, second = (re.fullmatch(
        r'XLA programs: (\d+) compiled, (\d+) loaded from the persistent '
        r'compilation cache \((.*)\)', line) for line in lines)
    assert first and second, lines
    assert int(first[1]) > 0 and first[3] == str(cache), lines
    assert (int(second[1]), int(second[2])) == (0, int(first[1]) + int(
        first[2])), lines
    assert any(cache.iterdir())

  def test_cli_compile_cache_off_and_unusable(self, tmp_path, capsys,
                                              no_xla_cache):
    base = ['--mutants', 'dense_xy_sign', '--reduced', '--quiet',
            '--no-builtins', '--compile-cache']
    assert selftest.main(base + ['off']) == 0
    assert capsys.readouterr().out.rstrip().splitlines()[-3].endswith(
        'persistent compilation cache (none in use)')
    blocker = tmp_path / 'a-file'
    blocker.write_text('')
    assert selftest.main(base + [str(blocker / 'xla')]) == 2
    captured = capsys.readouterr()
    assert captured.out == ''   # a usage error: nothing ran
    assert '--compile-cache' in captured.err and str(blocker) in captured.err
