"""The pytest plugin and the CLI, run the way users run them (subprocesses)."""

import atexit
import itertools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import types

import pytest

import etp
from etp_testing.strategies import strategy_for

pytest_plugins = ['pytester']

USER_CONFTEST = '''
import jax.numpy as jnp
import etp
import etp_testing
from etp import rule_util

BROKEN = {broken}


def impl(x, w):
  return 2.0 * (x @ w)


def xy_to_dw(x, g, weights):
  scale = 1.0 if BROKEN else 2.0   # the broken rule forgets the factor 2
  dw = scale * jnp.einsum('...i,...o->io', x, g)
  return {{'weight': dw.astype(weights['weight'].dtype)}}


def yw_to_w(g, trace):
  return {{'weight': g[..., None, :] * trace['weight']}}


prim = etp.register_primitive('user_scaled_mm', impl, batched=True,
                              trainable_invars_fn=lambda p: {{'weight': 1}})
prim.register_etp_rules(
    yw_to_w=yw_to_w, xy_to_dw=xy_to_dw,
    init_drtrl=lambda x, y, w, n: rule_util.weight_shaped_traces(
        x, y, w, n, batched=True),
    init_pp=rule_util.pp_trace)


def cases():
  from hypothesis import strategies as st
  from etp_testing.strategies import arrays_of, dims
  @st.composite
  def draw(draw):
    n_in, n_out = draw(dims()), draw(dims())
    return ((draw(arrays_of((2, n_in), 'float32')),
             draw(arrays_of((n_in, n_out), 'float32'))), {{}})
  return draw()


etp_testing.register_strategy(prim, cases())
'''

# A user's strategy with a bug.
RAISING_STRATEGY_CONFTEST = USER_CONFTEST.format(broken=False).replace(
    '    n_in, n_out = draw(dims()), draw(dims())\n',
    '    n_in, n_out = draw(dims()), draw(dims())\n'
    '    raise KeyError("no such layer")\n')
assert 'no such layer' in RAISING_STRATEGY_CONFTEST

# A user's strategy that draws the operands alone, without the params.
OPERANDS_ONLY_CONFTEST = USER_CONFTEST.format(broken=False).replace(
    "    return ((draw(", "    return (draw(").replace(
    "'float32'))), {})", "'float32')))")
assert OPERANDS_ONLY_CONFTEST != USER_CONFTEST.format(broken=False)

# One persistent XLA cache for this module's runs (each xdist worker its
# own), as a user's runs share theirs: a run loads the programs an earlier
# run compiled instead of compiling them again.  A test about the cache
# names its own directory after these (the last one named wins).
_XLA_CACHE = tempfile.mkdtemp(prefix='etp-test-plugin-xla-')
atexit.register(shutil.rmtree, _XLA_CACHE, True)
FAST = ['--etp-primitives', 'user_*', '--etp-checks',
        'xy_to_dw.vjp,yw_to_w.anchor,init.drtrl', '-p', 'no:cacheprovider',
        f'--etp-compile-cache={_XLA_CACHE}']


def _env(ci=False):
  """The environment of a user's run.  pytest reports differently when
  ``CI`` or ``BUILD_NUMBER`` is set, so a test states which it means."""
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=2'
  for name in ('CI', 'BUILD_NUMBER'):
    env.pop(name, None)
  # pytest rewrites the asserts of every module of a pytest11 plugin's
  # distribution (hypothesis: 73 modules) each time it starts, and keeps the
  # result only where bytecode may be written.  Where the environment says
  # it may not (this project's CI machine does), each run here started 2 s
  # slower (5.0 s against 3.1 s): about 80 runs of the suite's.
  env.pop('PYTHONDONTWRITEBYTECODE', None)
  if ci:
    env['CI'] = 'true'
  return env


def _run(tmp_path, *args, broken=False, timeout=300, ci=False,
         conftest=None):
  conftest = conftest or USER_CONFTEST.format(broken=broken)
  (tmp_path / 'conftest.py').write_text(conftest)
  return subprocess.run([sys.executable, '-m', 'pytest', *args],
                        cwd=tmp_path, capture_output=True, text=True,
                        env=_env(ci), timeout=timeout)


def test_help_lists_the_option_group(tmp_path):
  out = subprocess.run([sys.executable, '-m', 'pytest', '--help'],
                       cwd=tmp_path, capture_output=True, text=True).stdout
  assert 'ETP rule verification' in out
  for option in ('--etp-check', '--etp-primitives', '--etp-checks',
                 '--etp-examples', '--etp-devices', '--etp-report'):
    assert option in out



class _RecordingGroup:
  """Stands in for pytest's option group: records each option's keywords."""

  def __init__(self):
    self.options = {}

  def getgroup(self, *_):
    return self

  def addoption(self, name, **kwargs):
    self.options[name] = kwargs


def test_every_option_says_what_it_does():
  """Each ``--etp-*`` option and each ``etp-check`` option has help text
  (``--seed`` and ``--devices`` of the CLI once had none)."""
  from etp_testing import pytest_plugin
  from etp_testing._src import cli
  group = _RecordingGroup()
  pytest_plugin.pytest_addoption(group)
  assert len(group.options) >= 8
  plugin_bare = [n for n, kw in group.options.items() if not kw.get('help')]
  cli_bare = [a.option_strings for a in cli._parser()._actions
              if not a.help]
  assert plugin_bare == [] and cli_bare == []

@pytest.mark.parametrize('args,imports_jax', [
    ([], False), (['--etp-check', '--etp-primitives', 'etp_mv'], True)])
def test_only_an_etp_check_run_imports_jax(tmp_path, args, imports_jax):
  """pytest imports the plugin (and so ``etp_testing``) in every run where
  etp is installed; one without ``--etp-check`` must not import JAX."""
  code = ('import sys, pytest\n'
          f'pytest.main(["--collect-only", "-q", *{args!r}])\n'
          'print("jax imported:", "jax" in sys.modules)')
  proc = subprocess.run([sys.executable, '-c', code], cwd=tmp_path,
                        capture_output=True, text=True, env=_env())
  assert f'jax imported: {imports_jax}' in proc.stdout, proc.stdout + (
      proc.stderr)


def test_user_primitive_passes_in_an_empty_directory(tmp_path):
  report = tmp_path / 'report.json'
  proc = _run(tmp_path, '--etp-check', *FAST, f'--etp-report={report}')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'collected 3 items' in proc.stdout and '3 passed' in proc.stdout
  assert 'etp rule checks' in proc.stdout and 'user_scaled_mm' in proc.stdout
  data = json.loads(report.read_text())
  cells = data['primitives']['user_scaled_mm']
  assert set(cells) == {'xy_to_dw.vjp', 'yw_to_w.anchor', 'init.drtrl'}
  assert all(c['status'] == 'passed' for c in cells.values())
  assert all(c['message'] is None for c in cells.values())
  # How close each check came to its bound (init.drtrl compares nothing).
  assert 0 <= cells['xy_to_dw.vjp']['tolerance_used'] < 1
  assert cells['init.drtrl']['tolerance_used'] is None
  assert data['jax_version'] and data['devices'] and 'seed' in data
  assert data['etp_testing_version'] == etp.__version__


HEADLINE = '[etp_testing] user_scaled_mm failed 1 check(s): xy_to_dw.vjp'


@pytest.mark.parametrize('ci', [False, True], ids=['terminal', 'CI'])
def test_broken_user_rule_fails_with_the_rule_named(tmp_path, ci):
  """The snippet is printed once: under FAILURES, not again in the etp
  summary nor in the short test summary (which, with ``CI`` set, prints a
  plain-string report in full); with ``--tb=no`` in the etp summary.  The
  CI run goes through pytest-xdist, which sends the report between
  processes."""
  workers = ['-n', '2'] if ci else []
  proc = _run(tmp_path, '--etp-check', *FAST, *workers, broken=True, ci=ci)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'FAILED etp::user_scaled_mm::xy_to_dw.vjp' in proc.stdout
  assert 'xy_to_dw[weight]' in proc.stdout
  summary = proc.stdout.split('etp rule checks')[1]
  assert proc.stdout.count('Reproduce with:') == 1
  assert 'FAILED etp::user_scaled_mm::xy_to_dw.vjp' in summary
  assert 'xy_to_dw[weight]' in summary and 'Reproduce with:' not in summary
  short = proc.stdout.split('short test summary info')[1]
  assert 'xy_to_dw[weight]' not in short
  if ci:   # the whole headline, untrimmed, and nothing after it
    assert f'FAILED ::etp::user_scaled_mm::xy_to_dw.vjp - {HEADLINE}\n=' in short
  proc = _run(tmp_path, '--etp-check', *FAST, '--tb=no', broken=True, ci=ci)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  summary = proc.stdout.split('etp rule checks')[1]
  assert proc.stdout.count('Reproduce with:') == 1
  assert 'Reproduce with:' in summary



README = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'README.md')


def _readme_conftest() -> str:
  """The README's "Five minutes" ``conftest.py``, exactly as printed."""
  with open(README, encoding='utf-8') as f:
    text = f.read()
  found = re.search(r'```python\n(# conftest\.py .*?)```', text, re.S)
  assert found, 'README: no python block starting "# conftest.py"'
  return found.group(1)


def test_the_readme_s_five_minute_primitive_runs_as_printed(tmp_path):
  """A newcomer copies the README's conftest.py, runs the command it gives
  (every check), then breaks the rule as it says (drops the ``2.0`` of
  ``xy_to_dw``): the run fails that rule, with the item id the README says
  re-runs just it."""
  conftest = _readme_conftest()
  # As printed: pytest's cache directory (in tmp_path) is where the plugin
  # keeps compiled programs, so the later runs load what the first compiled.
  args = ['--etp-check', '--etp-primitives', 'my_*']
  proc = _run(tmp_path, *args, conftest=conftest)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert re.search(r'\b\d+ passed', proc.stdout) and 'failed' not in (
      proc.stdout.split('etp rule checks')[0]), proc.stdout
  broken = conftest.replace("dw = 2.0 * jnp.einsum", "dw = jnp.einsum")
  assert broken != conftest
  proc = _run(tmp_path, *args, conftest=broken)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert ('[etp_testing] my_scaled_mm failed 1 check(s): xy_to_dw.vjp'
          in proc.stdout)
  assert 'FAILED etp::my_scaled_mm::xy_to_dw.vjp' in proc.stdout
  assert 'Reproduce with:' in proc.stdout
  proc = _run(tmp_path, '--etp-check', '::etp::my_scaled_mm::xy_to_dw.vjp',
              conftest=broken)
  assert proc.returncode == 1 and '1 failed' in proc.stdout, proc.stdout

def test_a_failed_check_s_message_is_in_the_report(tmp_path):
  report = tmp_path / 'report.json'
  proc = _run(tmp_path, '--etp-check', *FAST, f'--etp-report={report}',
              broken=True)
  assert proc.returncode == 1
  cell = json.loads(report.read_text())['primitives']['user_scaled_mm']
  assert cell['xy_to_dw.vjp']['status'] == 'failed'
  assert cell['xy_to_dw.vjp']['tolerance_used'] > 1
  assert cell['xy_to_dw.vjp']['message'].startswith(HEADLINE)
  assert 'Reproduce with:' in cell['xy_to_dw.vjp']['message']


def test_a_strategy_error_shows_the_user_s_frames_and_is_an_error_cell(
    tmp_path):
  """A strategy that raises: the traceback starts in the user's code (not a
  thousand lines of pytest, pluggy and hypothesis), the etp summary and the
  report name it an error, with hypothesis's note that a strategy raised."""
  conftest = RAISING_STRATEGY_CONFTEST
  report = tmp_path / 'report.json'
  proc = _run(tmp_path, '--etp-check', *FAST, '--etp-checks', 'init.drtrl',
              f'--etp-report={report}', conftest=conftest)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  failures = proc.stdout.split('= FAILURES =')[1].split('etp rule checks')[0]
  assert 'raise KeyError("no such layer")' in failures
  assert 'conftest.py:' in failures and '_pytest' not in failures
  assert 'hypothesis/core.py' not in failures
  assert len(failures.splitlines()) < 40, failures
  summary = proc.stdout.split('etp rule checks')[1]
  assert 'ERROR etp::user_scaled_mm::init.drtrl' in summary
  assert "while generating 'case'" in summary and 'ERR' in summary
  assert 'raised at ' in summary and 'conftest.py:' in summary
  cell = json.loads(report.read_text())['primitives']['user_scaled_mm']
  assert cell['init.drtrl']['status'] == 'error'
  assert 'no such layer' in cell['init.drtrl']['message']
  # --fulltrace still shows everything.
  proc = _run(tmp_path, '--etp-check', *FAST, '--etp-checks', 'init.drtrl',
              '--fulltrace', conftest=conftest)
  assert '_pytest' in proc.stdout and 'hypothesis/core.py' in proc.stdout



def test_a_strategy_that_draws_no_params_is_one_sentence(tmp_path):
  """A strategy drawing the operands without ``params``: the item fails
  with one sentence saying what a strategy draws, no traceback (it would be
  the harness's alone), and the etp summary calls it an error."""
  report = tmp_path / 'report.json'
  proc = _run(tmp_path, '--etp-check', *FAST, '--etp-checks', 'xy_to_dw.vjp',
              f'--etp-report={report}', conftest=OPERANDS_ONLY_CONFTEST)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  failures = proc.stdout.split('= FAILURES =')[1].split('etp rule checks')[0]
  expected = ('[etp_testing] the strategy for user_scaled_mm drew a tuple of '
              '2 (float32[2, ')
  assert expected in failures and 'Traceback' not in failures
  assert 'def runtest' not in failures and len(failures.splitlines()) < 5
  assert 'ERROR etp::user_scaled_mm::xy_to_dw.vjp' in proc.stdout
  # Not hypothesis's note of the example as a call of the harness's own
  # test function, run(case=(make(0), ...)).
  assert 'Failing test case' not in proc.stdout and 'run(' not in proc.stdout
  cell = json.loads(report.read_text())['primitives']['user_scaled_mm']
  assert cell['xy_to_dw.vjp']['status'] == 'error'
  assert 'a strategy draws (operands, params)' in cell['xy_to_dw.vjp'][
      'message']
  assert 'Failing test case' not in cell['xy_to_dw.vjp']['message']

@pytest.mark.parametrize('option,words', [
    ('--etp-examples=0', "argument --etp-examples: '0' is not a number >= 1"),
    ('--etp-checks=nope', "--etp-checks: no check matches 'nope'"),
    ('--etp-primitives=user_*,nope', "no primitive matches 'nope'"),
])
def test_a_bad_option_value_is_a_usage_error(tmp_path, option, words):
  """Not an INTERNALERROR traceback, nor every item failing in
  hypothesis's words, nor a run that checks nothing."""
  proc = _run(tmp_path, '--etp-check', option, '-p', 'no:cacheprovider')
  assert proc.returncode == 4, proc.stdout + proc.stderr
  assert words in proc.stderr
  assert 'INTERNALERROR' not in proc.stdout + proc.stderr
  assert 'etp rule checks' not in proc.stdout   # no empty matrix


def test_last_failed_reruns_only_the_failed_check(tmp_path):
  """Node ids are ``::etp::<primitive>::<check>`` with one name per ``::``
  segment, so pytest's cache finds a failed check again (``--lf``)."""
  cached = [a for a in FAST if a not in ('-p', 'no:cacheprovider')]
  proc = _run(tmp_path, '--etp-check', *cached, broken=True)
  assert proc.returncode == 1 and '1 failed, 2 passed' in proc.stdout
  proc = _run(tmp_path, '--etp-check', *cached, '--lf', broken=True)
  assert proc.returncode == 1, proc.stdout + proc.stderr
  assert 'rerun previous 1 failure' in proc.stdout
  assert '1 failed, 2 deselected' in proc.stdout
  proc = _run(tmp_path, '--etp-check', *cached, '--lf')   # fixed: passes
  assert proc.returncode == 0 and '1 passed, 2 deselected' in proc.stdout


def test_a_printed_node_id_reruns_that_check_alone(tmp_path):
  """The id in ``FAILED ::etp::<primitive>::<check>`` is an argument that
  selects that check (pytest would look for a file of that name)."""
  proc = _run(tmp_path, '--etp-check', *FAST, broken=True)
  node_id = re.search(r'^FAILED (\S+) - ', proc.stdout, re.M).group(1)
  assert node_id == '::etp::user_scaled_mm::xy_to_dw.vjp'
  for ids in ([node_id], [node_id[2:], 'etp::user_scaled_mm::init.drtrl']):
    proc = _run(tmp_path, '--etp-check', *FAST, *ids, broken=True)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f'collected {len(ids)} item' in proc.stdout
    assert 'FAILED ::etp::user_scaled_mm::xy_to_dw.vjp' in proc.stdout
  proc = _run(tmp_path, '--etp-check', *FAST, 'etp::user_scaled_mm')
  assert proc.returncode == 0 and '3 passed' in proc.stdout
  proc = _run(tmp_path, '--etp-check', *FAST, 'etp::user_scaled_mm::fd')
  assert proc.returncode == 4
  assert 'etp::user_scaled_mm::fd names no check' in proc.stderr
  proc = _run(tmp_path, *FAST, node_id)   # no --etp-check: says to add it
  assert proc.returncode == 4
  assert f'pytest --etp-check {node_id}' in proc.stderr
  # A bare 'etp' is a path (a directory of that name), not the battery.
  proc = _run(tmp_path, '--etp-check', *FAST, '--co', 'etp')
  assert 'file or directory not found: etp' in proc.stdout + proc.stderr


@pytest.mark.parametrize('profile,examples', [('dev', 3), ('nightly', 50)])
def test_registered_hypothesis_profiles_are_selectable(tmp_path, profile,
                                                       examples):
  """Our profiles exist before hypothesis loads ``--hypothesis-profile``."""
  report = tmp_path / 'report.json'
  proc = _run(tmp_path, '--etp-check', '--etp-primitives', 'user_*',
              '--etp-checks', 'init.drtrl', f'--hypothesis-profile={profile}',
              f'--etp-report={report}')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  cell = json.loads(report.read_text())['primitives']['user_scaled_mm']
  assert cell['init.drtrl']['examples'] == examples


def test_compile_cache_is_written_and_reported(tmp_path):
  """Programs go to the persistent cache; a second run passes from it,
  compiling nothing: the report and the summary count the programs XLA
  compiled apart from those loaded from the cache."""
  cache, report = tmp_path / 'xla-cache', tmp_path / 'report.json'
  counts = []
  for _ in range(2):
    proc = _run(tmp_path, '--etp-check', *FAST, f'--etp-report={report}',
                f'--etp-compile-cache={cache}')
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data['compile_cache'] == str(cache)
    assert len(list(cache.iterdir())) > 5
    totals = data['compilations']
    per_check = data['primitives']['user_scaled_mm'].values()
    assert totals == {'compiled': sum(c['compiled'] for c in per_check),
                      'loaded': sum(c['loaded'] for c in per_check)}
    assert (f"XLA programs: {totals['compiled']} compiled, "
            f"{totals['loaded']} loaded") in proc.stdout
    counts.append(totals)
  cold, warm = counts
  # Cold, a program another check already compiled (the same HLO from
  # another jitted function) may come from the cache too.
  assert cold['compiled'] > 5, counts
  assert warm == {'compiled': 0,
                  'loaded': cold['compiled'] + cold['loaded']}, counts


def test_compile_cache_off(tmp_path):
  report = tmp_path / 'report.json'
  proc = _run(tmp_path, '--etp-check', *FAST, f'--etp-report={report}',
              '--etp-compile-cache=OFF')   # any case: not a directory 'OFF'
  assert proc.returncode == 0, proc.stdout + proc.stderr
  data = json.loads(report.read_text())
  assert data['compile_cache'] is None
  assert not (tmp_path / 'OFF').exists()
  # The options the harness's programs compiled with (none where this XLA
  # does not know them).
  from etp_testing._src import compilations
  assert data['compiler_options'] == compilations.options_in_effect()


def test_node_ids_and_collection_only_battery(tmp_path):
  (tmp_path / 'test_other.py').write_text('def test_x():\n  pass\n')
  proc = _run(tmp_path, '--etp-check', *FAST, '--collect-only', '-q')
  assert 'etp::user_scaled_mm::xy_to_dw.vjp' in proc.stdout
  assert 'test_other.py' not in proc.stdout     # no paths: the battery only
  proc = _run(tmp_path, '--etp-check', *FAST, '--collect-only', '-q', '.')
  assert 'test_other.py::test_x' in proc.stdout  # with paths: both
  assert 'etp::user_scaled_mm::init.drtrl' in proc.stdout


def test_gpu_only_device_check_is_skipped_not_passed(tmp_path):
  proc = _run(tmp_path, '--etp-check', '--etp-primitives', 'user_*',
              '--etp-checks', 'device.consistency', '--etp-devices', 'gpu',
              '-rs')
  if 'gpu' in subprocess.run(
      [sys.executable, '-c', 'import jax; print(jax.default_backend())'],
      capture_output=True, text=True).stdout:
    pytest.skip('a GPU is present')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert '1 skipped' in proc.stdout and 'no device' in proc.stdout
  # The -rs line says which primitive's check was skipped.
  assert any(line.startswith('SKIPPED') and
             'etp::user_scaled_mm::device.consistency: ' in line
             for line in proc.stdout.splitlines()), proc.stdout


def test_disabled_with_no_etp(tmp_path):
  proc = _run(tmp_path, '-p', 'no:etp', '--etp-check')
  assert proc.returncode != 0
  assert 'unrecognized arguments: --etp-check' in proc.stderr


VACUOUS_CONFTEST = USER_CONFTEST.format(broken=False) + textwrap.dedent('''
    import numpy as np

    # x = 0 on every case: the weight's gradient vanishes, and nothing of
    # its rules is checked.
    vac = etp.register_primitive('user_vacuous_mul', lambda x, w: x * w,
                                 trainable_invars_fn=lambda p: {'weight': 1})
    vac.register_etp_rules(
        xy_to_dw=lambda x, g, w: {'weight': (x * g).astype(w['weight'].dtype)},
        yw_to_w=lambda g, t: {'weight': g * t['weight']},
        init_drtrl=lambda x, y, w, n: rule_util.weight_shaped_traces(
            x, y, w, n, batched=False),
        init_pp=rule_util.pp_trace)

    def zero_x():
      from hypothesis import strategies as st
      from etp_testing.strategies import arrays_of, dims
      @st.composite
      def draw(draw):
        n = draw(dims())
        return ((np.zeros((n,), np.float32),
                 draw(arrays_of((n,), 'float32'))), {})
      return draw()

    etp_testing.register_strategy(vac, zero_x())
    ''')


def test_the_report_keeps_the_warnings_about_a_case(tmp_path):
  # A VacuousCaseWarning was a Python warning only: not in the JSON report,
  # and without the case it was about.
  proc = _run(tmp_path, '--etp-check', '--etp-primitives', 'user_*',
              '--etp-checks', 'xy_to_dw.vjp', '-p', 'no:cacheprovider',
              f'--etp-compile-cache={_XLA_CACHE}', '--etp-report',
              str(tmp_path / 'r.json'), conftest=VACUOUS_CONFTEST)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'VacuousCaseWarning' in proc.stdout   # pytest's summary still
  records = json.loads((tmp_path / 'r.json').read_text())['primitives']
  warned = records['user_vacuous_mul']['xy_to_dw.vjp']['warnings']
  assert warned and all(
      'every gradient comparison of weight was zero against zero' in w and
      "(the case: params {}, operands float32[" in w for w in warned), warned
  assert records['user_scaled_mm']['xy_to_dw.vjp']['warnings'] == []


def test_xdist_gives_the_same_outcome(tmp_path):
  """Under -n, the outcome is the same, and a worker leaves GPU memory to
  the others (a user's test beside the battery reads the setting)."""
  pytest.importorskip('xdist')
  (tmp_path / 'test_worker.py').write_text(textwrap.dedent('''
      import os

      def test_worker_does_not_preallocate():
        assert os.environ['PYTEST_XDIST_WORKER']
        assert os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] == 'false'
      '''))
  proc = _run(tmp_path, '--etp-check', *FAST, '-n', '2', '-v',
              'test_worker.py')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert '4 passed' in proc.stdout
  assert 'pass' in proc.stdout.split('etp rule checks')[-1]


def test_xdist_run_whose_worker_dies_ends_and_reports(tmp_path):
  """A rule that kills its process (a segfault, an out-of-memory kill):
  the run ends and says so, and the other items are reported.  (Under
  xdist's loadscope, once this plugin's default, the run hung.)"""
  pytest.importorskip('xdist')
  conftest = USER_CONFTEST.format(broken=False) + textwrap.dedent('''
      import os

      def dying_xy_to_dw(x, g, weights):
        os._exit(3)

      dying = etp.register_primitive(
          'user_dying_mm', impl, batched=True,
          trainable_invars_fn=lambda p: {'weight': 1})
      dying.register_etp_rules(
          yw_to_w=yw_to_w, xy_to_dw=dying_xy_to_dw,
          init_drtrl=lambda x, y, w, n: rule_util.weight_shaped_traces(
              x, y, w, n, batched=True),
          init_pp=rule_util.pp_trace)
      etp_testing.register_strategy(dying, cases())
      ''')
  proc = _run(tmp_path, '--etp-check', *FAST, '-n', '2', timeout=240,
              conftest=conftest)
  assert proc.returncode != 0, proc.stdout + proc.stderr
  assert 'crashed' in proc.stdout, proc.stdout
  assert 'etp rule checks' in proc.stdout, proc.stdout


def test_xdist_auto_starts_a_worker_per_primitive_at_most(tmp_path):
  pytest.importorskip('xdist')
  env_cap = os.environ.get('PYTEST_XDIST_AUTO_NUM_WORKERS')
  if env_cap or (os.cpu_count() or 1) < 2:
    pytest.skip('needs 2 CPUs and no PYTEST_XDIST_AUTO_NUM_WORKERS')
  proc = _run(tmp_path, '--etp-check', *FAST, '--etp-checks', 'init.pp',
              '-n', 'auto')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  # One primitive (user_*) is selected: one worker, not one per CPU.
  assert '1 worker [1 item]' in proc.stdout, proc.stdout


class _Config:
  """The part of a pytest config the xdist hooks read."""

  def __init__(self, etp_check=True, args=(), primitives=None):
    self.options = {'etp_check': etp_check, 'etp_primitives': primitives,
                    'etp_checks': None}
    self.invocation_params = types.SimpleNamespace(args=tuple(args))
    self.stash = {}

  def getoption(self, name, default=None):
    return self.options.get(name, default)


def test_xdist_auto_workers_capped_by_the_primitives(monkeypatch):
  pytest.importorskip('xdist')
  from etp_testing import pytest_plugin
  monkeypatch.delenv('PYTEST_XDIST_AUTO_NUM_WORKERS', raising=False)
  monkeypatch.setattr('xdist.plugin.pytest_xdist_auto_num_workers',
                      lambda config: 16)
  config = _Config(primitives='etp_mv,etp_mm')
  assert pytest_plugin.pytest_xdist_auto_num_workers(config) == 2
  assert pytest_plugin.pytest_xdist_auto_num_workers(_Config()) == len(
      [p for p in etp.primitives() if strategy_for(p) is not None])
  assert pytest_plugin.pytest_xdist_auto_num_workers(
      _Config(etp_check=False)) is None
  monkeypatch.setenv('PYTEST_XDIST_AUTO_NUM_WORKERS', '3')
  assert pytest_plugin.pytest_xdist_auto_num_workers(config) is None


def test_worker_leaves_gpu_memory_to_the_others(monkeypatch):
  from etp_testing import pytest_plugin
  for name in ('XLA_PYTHON_CLIENT_PREALLOCATE',
               'XLA_PYTHON_CLIENT_MEM_FRACTION', 'XLA_CLIENT_MEM_FRACTION'):
    monkeypatch.delenv(name, raising=False)
  pytest_plugin._share_the_gpu()
  assert os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] == 'false'
  monkeypatch.delenv('XLA_PYTHON_CLIENT_PREALLOCATE')
  monkeypatch.setenv('XLA_CLIENT_MEM_FRACTION', '.3')   # the user's choice
  pytest_plugin._share_the_gpu()
  assert 'XLA_PYTHON_CLIENT_PREALLOCATE' not in os.environ


def test_fixture_and_marker(tmp_path):
  (tmp_path / 'test_mine.py').write_text(textwrap.dedent('''
      import numpy as np
      import pytest
      import etp

      @pytest.mark.etp_check
      def test_dense(etp_check):
        x = np.ones((2, 3), np.float32)
        w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
        report = etp_check(etp.etp_mm_p, x, w, checks='xy_to_dw',
                           has_bias=False)
        assert report.passed

      def test_hypothesis(etp_check):
        s = etp_check.hypothesis(etp.etp_mv_p, max_examples=2,
                                 checks=['xy_to_dw.vjp'])
        assert s.examples == 2

      def test_nothing_checkable(etp_check):
        x = np.ones((2, 3), np.float32)
        w = np.ones((3, 4), np.float32)
        etp_check(etp.etp_mm_p, x, w, checks='drtrl.instant', has_bias=False)
        raise AssertionError('etp_check returned on an all-skipped case')
      '''))
  proc = _run(tmp_path, '-p', 'no:cacheprovider', '-rs', 'test_mine.py')
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert '2 passed, 1 skipped' in proc.stdout
  assert 'nothing was checked' in proc.stdout


def test_a_rule_failure_in_a_user_s_test_shows_the_message(tmp_path):
  """Through the etp_check fixture or check_with_hypothesis in a test of
  one's own: pytest printed the harness's source (84 to 177 lines a
  failure) and an 'E' before every line of the snippet."""
  (tmp_path / 'test_mine.py').write_text(textwrap.dedent('''
      import numpy as np
      import etp, etp_testing

      def test_fixture(etp_check):
        x = np.ones((2, 3), np.float32)
        w = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
        prim = [p for p in etp.primitives() if p.name == 'user_scaled_mm'][0]
        etp_check(prim, x, w, checks='xy_to_dw.vjp')

      def test_hypothesis():
        prim = [p for p in etp.primitives() if p.name == 'user_scaled_mm'][0]
        etp_testing.check_with_hypothesis(prim, max_examples=2, seed=0,
                                          checks=['xy_to_dw.vjp'])
      '''))
  for extra in ([], ['--fulltrace']):
    proc = _run(tmp_path, '-p', 'no:cacheprovider', 'test_mine.py', *extra,
                broken=True)
    assert proc.returncode == 1 and '2 failed' in proc.stdout, proc.stdout
    harness_source = 'def assert_rule_consistent' in proc.stdout
    if extra:
      assert harness_source   # --fulltrace: the whole traceback
      continue
    assert not harness_source, proc.stdout
    assert proc.stdout.count('\nReproduce with:\nimport jax\n') == 2, (
        proc.stdout)
    assert 'E   ' not in proc.stdout, proc.stdout
    assert proc.stdout.count('[etp_testing] user_scaled_mm failed 1 '
                             'check(s): xy_to_dw.vjp') >= 2


def _snippet(output: str) -> str:
  """The first reproduction snippet in ``output``: the lines after
  ``Reproduce with:`` up to a blank line or pytest's next section."""
  lines = output.split('Reproduce with:\n', 1)[1].splitlines()
  taken = itertools.takewhile(
      lambda l: l.strip() and not l.startswith(('=', '_')), lines)
  return '\n'.join(taken)


def test_cli_exit_codes_and_matrix(tmp_path):
  (tmp_path / 'conftest.py').write_text(USER_CONFTEST.format(broken=False))
  base = [sys.executable, '-m', 'etp_testing', '--conftest',
          str(tmp_path / 'conftest.py'), '--primitives', 'user_*',
          '--checks', 'xy_to_dw.vjp', '--examples', '2',
          '--compile-cache', 'off']
  ok = subprocess.run(base, capture_output=True, text=True, env=_env())
  assert ok.returncode == 0, ok.stdout + ok.stderr
  assert 'xy_to_dw.vjp' in ok.stdout and 'pass' in ok.stdout
  (tmp_path / 'conftest.py').write_text(USER_CONFTEST.format(broken=True))
  report = tmp_path / 'report.json'
  bad = subprocess.run(base + ['--report', str(report)], capture_output=True,
                       text=True, env=_env())
  assert bad.returncode == 1 and 'FAIL' in bad.stdout
  # The report holds the failing primitive, as pytest --etp-report does.
  data = json.loads(report.read_text())
  cell = data['primitives']['user_scaled_mm']['xy_to_dw.vjp']
  assert cell['status'] == 'failed' and cell['max_rel_err'] > 0.1
  assert cell['seed'] == 0 and cell['examples'] == 2
  assert cell['skip_reasons'] == []   # a list, as for a passed check
  assert 'Reproduce with' in cell['message']
  assert data['totals'] == {'failed': 1} and data['jax_version']
  # Its snippet re-runs the failure in a fresh process, elsewhere: the
  # conftest it ran is run again from its path.
  snippet = _snippet(bad.stdout)
  assert 'etp_conftest_' not in snippet
  elsewhere = tmp_path / 'elsewhere'
  elsewhere.mkdir()
  rerun = subprocess.run([sys.executable, '-c', snippet], cwd=elsewhere,
                         capture_output=True, text=True, env=_env())
  assert 'RuleConsistencyError' in rerun.stderr, rerun.stdout + rerun.stderr
  assert 'xy_to_dw.vjp' in rerun.stderr
  usage = subprocess.run(base + ['--checks', 'no_such_check'],
                         capture_output=True, text=True, env=_env())
  assert usage.returncode == 2 and 'no check matches' in usage.stderr
  usage = subprocess.run(base + ['--examples', '0'], capture_output=True,
                         text=True, env=_env())
  assert usage.returncode == 2 and 'is not a number >= 1' in usage.stderr
  # A strategy that raises: an error cell, the others still run, status 1.
  (tmp_path / 'conftest.py').write_text(RAISING_STRATEGY_CONFTEST)
  raised = subprocess.run(base[:6] + ['user_*,etp_mv', *base[7:]],
                          capture_output=True, text=True, env=_env())
  assert raised.returncode == 1, raised.stdout + raised.stderr
  assert 'Traceback' not in raised.stderr
  row = [l for l in raised.stdout.splitlines() if l.startswith('xy_to_dw')]
  assert row[0].split()[1:] == ['pass', '0', 'ERR'], raised.stdout
  assert "user_scaled_mm: checking it raised KeyError: 'no such layer'" in (
      raised.stdout)
  assert 'conftest.py:' in raised.stdout


def _cli(capsys, *args):
  """``etp-check ARGS`` in this process: (exit status, stdout, stderr)."""
  from etp_testing._src import cli
  status = cli.main(['--compile-cache', 'off', *args])
  out = capsys.readouterr()
  return status, out.out, out.err


@pytest.mark.parametrize('option,name,content,error', [
    ('--conftest', 'bad_conftest.py', 'import etp\nundefined_name\n',
     "NameError: name 'undefined_name' is not defined"),
    ('--import', 'etp_cli_syntax_error', 'def broken(:\n', 'SyntaxError'),
], ids=['conftest', 'import'])
def test_cli_code_it_loads_that_raises_is_a_usage_error(
    tmp_path, monkeypatch, capsys, option, name, content, error):
  path = tmp_path / (name if name.endswith('.py') else name + '.py')
  path.write_text(content)
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  status, out, err = _cli(capsys, option,
                          str(path) if option == '--conftest' else name)
  assert status == 2, out + err
  assert err.startswith(f'etp-check: {option} ') and error in err, err
  assert 'Traceback' not in out + err
  if option == '--conftest':
    assert f'{path.name}:2' in err   # where, in the user's file


def test_cli_a_primitive_pattern_that_matches_nothing_is_a_usage_error(
    capsys):
  # As pytest --etp-primitives: each pattern must match, so a typo beside a
  # right name is not silently dropped.
  status, _, err = _cli(capsys, '--primitives', 'etp_mv,etp_nosuch',
                        '--checks', 'init.pp')
  assert status == 2
  assert "--primitives: no primitive matches 'etp_nosuch'" in err
  assert 'known primitives: ' in err and 'etp_lora_mm' in err


def test_cli_exits_5_when_nothing_was_checked(capsys):
  # etp_mv has no instant_drtrl: the one selected check skips.
  status, out, err = _cli(capsys, '--primitives', 'etp_mv', '--checks',
                          'drtrl.instant', '--examples', '1')
  assert status == 5, out + err
  assert 'nothing was checked (every selected check skipped)' in err
  # One check that runs beside it: a pass.
  status, out, err = _cli(capsys, '--primitives', 'etp_mv', '--checks',
                          'drtrl.instant,init.pp', '--examples', '1')
  assert status == 0, out + err


def test_cli_script_imports_a_module_of_the_current_directory(tmp_path):
  # The etp-check console script's sys.path starts at its own directory,
  # not the one it runs in: --import of the user's module must still work.
  (tmp_path / 'my_layers.py').write_text(USER_CONFTEST.format(broken=False))
  bin_dir = tmp_path / 'bin'
  bin_dir.mkdir()
  (bin_dir / 'etp-check').write_text(
      'import sys\nfrom etp_testing._src.cli import main\nsys.exit(main())\n')
  proc = subprocess.run(
      [sys.executable, str(bin_dir / 'etp-check'), '--import', 'my_layers',
       '--primitives', 'user_*', '--checks', 'primitive.abstract_eval',
       '--examples', '1', '--compile-cache', 'off'],
      cwd=tmp_path, capture_output=True, text=True, env=_env())
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert 'user_scaled_mm' in proc.stdout


@pytest.mark.parametrize('cache', ['a_file', ''])
def test_a_compile_cache_that_cannot_be_made_is_a_usage_error(tmp_path,
                                                               cache):
  (tmp_path / 'a_file').write_text('not a directory')
  proc = _run(tmp_path, '--etp-check', *FAST,
              f'--etp-compile-cache={cache}')
  assert proc.returncode == 4, proc.stdout + proc.stderr
  out = proc.stdout + proc.stderr
  assert 'INTERNALERROR' not in out and 'Traceback' not in out
  assert 'ERROR: --etp-compile-cache: ' in out


def test_cli_compile_cache_is_written_and_reported(tmp_path):
  """The second run of the same battery loads every program from the
  persistent cache; by default the cache is under $XDG_CACHE_HOME."""
  env = {**_env(), 'XDG_CACHE_HOME': str(tmp_path / 'xdg')}
  base = [sys.executable, '-m', 'etp_testing', '--primitives', 'etp_mv',
          '--checks', 'xy_to_dw.vjp,primitive.jit', '--examples', '2']
  counts = []
  for run in ('cold', 'warm'):
    report = tmp_path / f'{run}.json'
    proc = subprocess.run(base + ['--report', str(report)],
                          capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(report.read_text())
    assert data['compile_cache'] == str(tmp_path / 'xdg' / 'etp_testing' /
                                        'xla')
    programs = data['compilations']
    assert (f"XLA programs: {programs['compiled']} compiled, "
            f"{programs['loaded']} loaded" in proc.stdout)
    counts.append((programs['compiled'], programs['loaded']))
  (cold_compiled, cold_loaded), warm = counts
  assert cold_compiled > 2
  assert warm == (0, cold_compiled + cold_loaded), counts
  off = subprocess.run(base + ['--compile-cache', 'off'], capture_output=True,
                       text=True, env=env)
  assert off.returncode == 0 and '(none in use)' in off.stdout
