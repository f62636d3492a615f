"""pytest plugin ``etp``: ``pytest --etp-check`` runs the ETP rule battery.

Registered through the ``pytest11`` entry point; ``-p no:etp`` turns it off.
This module imports neither JAX nor the harness (only two light modules of
it, ``cli`` for an option type and ``errors``): the work lives in
``etp_testing._src.plugin`` and loads only with ``--etp-check`` or when the
``etp_check`` fixture is used.  A test checks that a run without
``--etp-check`` leaves JAX unimported.
"""

from __future__ import annotations

import os
import re

import pytest

from etp_testing._src.cli import positive_int
from etp_testing._src.errors import PREFIX, RuleConsistencyError

DEFAULT_EXAMPLES = 3
RESULT_KEY = 'etp_check_result'
# A battery node id as pytest prints it: ``::etp::<primitive>::<check>`` (the
# leading ``::`` optional, the last parts too, but some ``::``: a bare
# ``etp`` is a path, such as this project's own package directory).
NODE_ID = re.compile(
    r'(?=.*::)(?:::)?etp(?:::(?P<prim>[^:]+)(?:::(?P<check>[^:]+))?)?')

# name -> hypothesis settings; registered unless the user has one by that name.
# ('ci' is hypothesis's own profile: 100 derandomized examples.)
PROFILES = {
    'dev': dict(max_examples=3),
    'nightly': dict(max_examples=50, print_blob=True),
}


def pytest_addoption(parser):
  group = parser.getgroup('etp', 'ETP rule verification (etp_testing)')
  group.addoption('--etp-check', action='store_true', default=False,
                  help='collect the ETP rule battery: one item per '
                  '(primitive, check) for every primitive with a strategy. '
                  'Without paths, only the battery runs.')
  group.addoption('--etp-primitives', default=None, metavar='NAMES',
                  help='comma list of primitive names or glob patterns')
  group.addoption('--etp-checks', default=None, metavar='NAMES',
                  help='comma list of check names, groups (xy_to_dw) or globs')
  group.addoption('--etp-examples', type=positive_int, default=None,
                  metavar='N',
                  help='hypothesis examples per item (default: the active '
                  f'--hypothesis-profile, else {DEFAULT_EXAMPLES})')
  group.addoption('--etp-devices', default='all',
                  choices=('cpu', 'gpu', 'all'),
                  help='devices for device.consistency (default: all)')
  group.addoption('--etp-report', default=None, metavar='PATH',
                  help='write a JSON report of every (primitive, check)')
  group.addoption('--etp-fast', action='store_true', default=False,
                  help='random-projection mode everywhere (no full Jacobians)')
  group.addoption('--etp-compile-cache', default='auto', metavar='DIR',
                  help="persistent XLA compilation cache for the battery: a "
                  "directory, 'auto' (default: in pytest's cache directory) "
                  "or 'off'; a JAX cache directory already configured wins")


def _register_profiles():
  from hypothesis import settings
  known = getattr(settings, '_profiles', {})
  for name, kwargs in PROFILES.items():
    if name not in known:
      settings.register_profile(name, **kwargs)


@pytest.hookimpl(tryfirst=True)   # before hypothesis loads --hypothesis-profile
def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'etp_check: an ETP rule-battery test (the --etp-check items, '
      'or a user test that runs the battery).')
  _register_profiles()
  if config.getoption('etp_check', False):
    if hasattr(config, 'workerinput'):
      _share_the_gpu()
    from etp_testing._src.plugin import EtpCheckPlugin
    config.pluginmanager.register(EtpCheckPlugin(config), 'etp-check-session')
    return
  for arg in config.getoption('file_or_dir', None) or []:
    if NODE_ID.fullmatch(arg):   # pytest would say "file not found"
      raise pytest.UsageError(
          f'{PREFIX}{arg} is a check of the ETP battery, collected '
          'with --etp-check: pytest --etp-check ' + arg)


def _share_the_gpu():
  """In an xdist worker, before JAX starts its backend: JAX preallocates 75 %
  of a GPU's memory per process, so a second worker on the same GPU would run
  out; each allocates what it uses instead.  A user's own setting wins."""
  if not any(v in os.environ for v in (
      'XLA_PYTHON_CLIENT_PREALLOCATE', 'XLA_PYTHON_CLIENT_MEM_FRACTION',
      'XLA_CLIENT_MEM_FRACTION')):
    os.environ['XLA_PYTHON_CLIENT_PREALLOCATE'] = 'false'


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config):
  """``-n auto`` with ``--etp-check``: no more workers than primitives to
  check, as a worker costs a JAX start-up and much of a primitive's work is
  shared by its checks.  ``PYTEST_XDIST_AUTO_NUM_WORKERS`` wins, as it does
  for xdist.  (The items are dealt out by xdist's default, ``load``:
  ``loadscope``, a primitive per worker, compiled 76 fewer programs of the
  default battery's 577, but it hangs the whole run, report and all, when a
  worker dies, as one would on a rule that crashes the process.)"""
  if (not config.getoption('etp_check', False) or
      os.environ.get('PYTEST_XDIST_AUTO_NUM_WORKERS')):
    return None
  from xdist.plugin import pytest_xdist_auto_num_workers as cpus
  from etp_testing._src.plugin import battery_primitive_count
  return max(1, min(cpus(config), battery_primitive_count(config)))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
  """A ``RuleConsistencyError`` in a user's own test (the ``etp_check``
  fixture, ``assert_rule_consistent``, ``check_with_hypothesis``) is shown
  as its message, as the battery's items show it: pytest's traceback
  printed the harness's source (84 to 177 lines a failure) and put ``E``
  before every line of the snippet, which then did not paste.  The crash
  line names the test's own line; ``--fulltrace`` keeps the traceback."""
  outcome = yield
  report = outcome.get_result()
  excinfo = call.excinfo
  if (report.failed and excinfo is not None
      and isinstance(excinfo.value, RuleConsistencyError)
      and not item.config.getoption('fulltrace', False)
      and not getattr(item, 'shows_rule_failures', False)):
    from etp_testing._src.plugin import message_repr, user_frames
    entry = user_frames(excinfo.traceback)[-1]
    report.longrepr = message_repr(str(excinfo.value),
                                   f'{entry.path}:{entry.lineno + 1}')


@pytest.fixture
def etp_check(request):
  """Runs the battery inside a test: ``etp_check(primitive, *operands,
  **params)`` or ``etp_check.hypothesis(primitive, max_examples=...)``."""
  from etp_testing._src.plugin import EtpCheckFixture
  return EtpCheckFixture(request)
