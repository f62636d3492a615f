"""The pytest side of ``pytest --etp-check`` (loaded only when it is used).

``etp_testing.pytest_plugin`` (the ``pytest11`` entry point) adds the options
and imports this module lazily, so a pytest run without ``--etp-check`` never
imports JAX through the plugin.

Collection: one item per (primitive, check) for every primitive in
``etp.primitives()`` with a strategy, named ``etp::<primitive>::<check>``.
Without path arguments only the battery is collected; with paths, the battery
runs next to the tests found there.  A node id among the arguments
(``::etp::etp_mm::xy_to_dw.vjp``, ``etp::etp_mm``) selects those items.

Compilation: the battery compiles a few dozen XLA programs per primitive and
shape, and hypothesis draws the same shapes on every run; a persistent XLA
compilation cache (``--etp-compile-cache``, by default in pytest's cache
directory) lets a second run load them from disk instead (about 3x faster on
a 2-core CPU machine).  A cache the user configured for JAX is left alone.
"""

from __future__ import annotations

import fnmatch
import json
import time

import pytest

from etp_testing._src import report_file
from etp_testing._src.report import strict_json_data
from etp_testing._src.cli import unmatched_primitives
from etp_testing._src.errors import (MACHINERY, PREFIX, RuleConsistencyError,
                                     StrategyError, package_dirs)
from etp_testing.pytest_plugin import DEFAULT_EXAMPLES, NODE_ID, RESULT_KEY


def _split(value):
  return [v.strip() for v in (value or '').split(',') if v.strip()]


def _matches(name, patterns):
  return not patterns or any(fnmatch.fnmatchcase(name, p) for p in patterns)


def configure_compile_cache(config):
  """Points JAX's persistent compilation cache at the option's directory
  (``auto``: ``<pytest cache>/etp-xla``, none without the cacheprovider
  plugin; ``off``: none); returns the directory in use, or ``None``."""
  from etp_testing._src import compilations
  cache = getattr(config, 'cache', None)
  return compilations.use_persistent_cache(
      config.getoption('etp_compile_cache'),
      lambda: None if cache is None else str(cache.mkdir('etp-xla')))


NODE_IDS = pytest.StashKey[list]()


def take_node_id_args(config) -> list:
  """Moves the battery node ids among the path arguments (``pytest
  --etp-check ::etp::etp_mm::xy_to_dw.vjp``, copied from a report) out of
  them, where pytest would look for a file, into ``config.stash``; returns
  them as ``(argument, primitive, check)`` (``None``: any)."""
  paths, ids = [], []
  for arg in config.option.file_or_dir or []:
    match = NODE_ID.fullmatch(arg)
    if match:
      ids.append((arg, match.group('prim'), match.group('check')))
    else:
      paths.append(arg)
  if ids:
    config.option.file_or_dir = paths
    config.args = [a for a in config.args if not NODE_ID.fullmatch(a)]
  config.stash[NODE_IDS] = ids
  return ids


def _named(prim_name, check, ids) -> bool:
  """Whether node ids ``ids`` (none: all) name ``check`` of ``prim_name``
  (``check=None``: some check of it)."""
  return not ids or any(
      p in (None, prim_name) and (check is None or c in (None, check))
      for _, p, c in ids)


def selected(config):
  """``[(primitive, check_name)]`` the options (and node id arguments)
  select, in a fixed order, and the primitives that have no strategy."""
  import etp
  from etp_testing._src import strategies
  from etp_testing._src.checks import registry as check_registry
  prim_patterns = _split(config.getoption('etp_primitives'))
  check_patterns = _split(config.getoption('etp_checks'))
  try:
    checks = check_registry.select(check_patterns or 'all')
  except ValueError as e:   # a usage error, not pytest's INTERNALERROR
    raise pytest.UsageError(
        f'{PREFIX}--etp-checks: ' + str(e).removeprefix(PREFIX)) from None
  prims = etp.primitives()
  unmatched = unmatched_primitives(prim_patterns, [p.name for p in prims])
  if unmatched:
    raise pytest.UsageError(f'{PREFIX}--etp-primitives: {unmatched}')
  ids = config.stash.get(NODE_IDS, [])
  pairs, unchecked = [], []
  for prim in prims:
    if not _matches(prim.name, prim_patterns) or not _named(prim.name, None,
                                                            ids):
      continue
    if strategies.strategy_for(prim) is None:
      unchecked.append(prim.name)
      continue
    pairs.extend((prim, c) for c in checks if _named(prim.name, c, ids))
  for arg, prim, check in ids:
    if not any(_named(p.name, c, [(arg, prim, check)]) for p, c in pairs):
      raise pytest.UsageError(
          f'{PREFIX}{arg} names no check of the battery: ids are '
          'etp::<primitive>::<check>, for a primitive with a strategy and a '
          'check the --etp-primitives and --etp-checks options select '
          '(pytest --etp-check --collect-only -q lists them)')
  return pairs, unchecked


def battery_primitive_count(config) -> int:
  """How many primitives the options select for the battery (node ids
  aside: they are read later); 1 where the options are wrong, as the run
  stops at collection to say so."""
  try:
    pairs, _ = selected(config)
  except pytest.UsageError:
    return 1
  return len({prim for prim, _ in pairs})


def examples(config) -> int:
  n = config.getoption('etp_examples')
  if n is not None:
    return n
  if config.getoption('hypothesis_profile', None):
    from hypothesis import settings
    return settings().max_examples
  return DEFAULT_EXAMPLES


def seed(config) -> int:
  value = config.getoption('hypothesis_seed', None)
  return int(value) if value is not None else 0


def compile_totals(records) -> tuple:
  """``(compiled, loaded)``: XLA programs the checks compiled, and those
  they loaded from the persistent compilation cache, summed over
  ``records``."""
  records = list(records)
  return (sum(r.get('compiled') or 0 for r in records),
          sum(r.get('loaded') or 0 for r in records))


class EtpCheckItem(pytest.Item):
  """One check of one primitive over generated examples."""

  shows_rule_failures = True   # repr_failure below: message only

  def __init__(self, *, primitive, check, **kwargs):
    super().__init__(**kwargs)
    self.primitive = primitive
    self.check = check
    self.add_marker('etp_check')

  def runtest(self):
    from etp_testing._src import compilations
    from etp_testing._src.hypothesis_runner import check_with_hypothesis
    config = self.config
    start = time.perf_counter()
    record = {'primitive': self.primitive.name, 'check': self.check,
              'seed': seed(config), 'examples': examples(config)}
    try:
      with compilations.counting() as programs, \
          report_file.recording_warnings() as warned:
        try:
          summary = check_with_hypothesis(
              self.primitive, max_examples=examples(config),
              checks=[self.check], seed=seed(config),
              devices=config.getoption('etp_devices'),
              fast=True if config.getoption('etp_fast') else None)
        finally:
          record.update(compiled=programs.count, loaded=programs.loaded,
                        warnings=warned)
    except Exception as e:
      record.update(report_file.failure_fields(self.check, e),
                    duration_s=time.perf_counter() - start)
      self.user_properties.append(
          (RESULT_KEY, json.dumps(strict_json_data(record))))
      raise
    result = summary.checks[self.check]
    record.update(status=result.status, duration_s=summary.duration_s,
                  max_abs_err=result.max_abs_err,
                  max_rel_err=result.max_rel_err,
                  tolerance_used=result.tolerance_used,
                  examples=summary.examples, skipped=result.skipped,
                  skip_reasons=result.skip_reasons)
    self.user_properties.append(
        (RESULT_KEY, json.dumps(strict_json_data(record))))
    if result.status == 'skipped':
      # pytest's -rs line names where the skip was raised (this file), not
      # the item: the reason names it.
      pytest.skip(f"{self.label}: "
                  f"{'; '.join(result.skip_reasons) or 'skipped'}")

  def repr_failure(self, excinfo, style=None):
    if isinstance(excinfo.value, (RuleConsistencyError, StrategyError)):
      return message_repr(str(excinfo.value), self.label)
    if not self.config.getoption('fulltrace', False):
      excinfo.traceback = user_frames(excinfo.traceback)
    return super().repr_failure(excinfo, style)

  def reportinfo(self):
    return self.path, None, self.label

  @property
  def label(self) -> str:
    return item_label(self.primitive.name, self.check)


def item_label(primitive_name: str, check: str) -> str:
  """``etp::<primitive>::<check>``, as reports name a check's item."""
  return f'etp::{primitive_name}::{check}'


def user_frames(traceback):
  """The frames of ``traceback`` in the user's code (a strategy, a rule):
  without pytest's, pluggy's and hypothesis's, and without the harness's
  where any others remain; the whole traceback where none do.  An error
  in a user's strategy otherwise shows a thousand lines of their machinery
  (``--fulltrace`` shows them)."""
  machinery, harness = package_dirs(*MACHINERY), package_dirs('etp_testing')
  outside = traceback.filter(
      lambda entry: not str(entry.path).startswith(machinery))
  users = outside.filter(lambda entry: not str(entry.path).startswith(harness))
  return users or outside or traceback


def message_repr(message: str, where: str):
  """A failure shown as ``message`` in pytest's FAILURES section, with the
  message's first line as its crash line (``where:0: <first line>`` under
  ``--tb=line``).

  The short test summary prints a report's crash line; for a plain string
  report that is the whole string whenever ``CI`` is set or under ``-vv``,
  which repeated every snippet.  Built from pytest's own exception repr
  classes (what pytest-xdist sends between processes); a pytest whose
  classes moved or changed gets the string.
  """
  try:
    from _pytest._code.code import (ExceptionChainRepr, ReprEntryNative,
                                    ReprFileLocation, ReprTraceback)
    lines = [line + '\n' for line in message.splitlines()]
    traceback = ReprTraceback(reprentries=[ReprEntryNative(lines)],
                              extraline=None, style='native')
    crash = ReprFileLocation(path=where, lineno=0,
                             message=message.split('\n', 1)[0])
    return ExceptionChainRepr([(traceback, crash, None)])
  except (ImportError, TypeError):   # pragma: no cover - a pytest that
    return message                   # moved or changed them


class EtpPrimitiveCollector(pytest.Collector):
  """One primitive's node: its selected checks' items."""

  def __init__(self, *, primitive, checks, **kwargs):
    super().__init__(**kwargs)
    self.primitive = primitive
    self.checks = checks

  def collect(self):
    for check in self.checks:
      yield EtpCheckItem.from_parent(self, name=check,
                                     primitive=self.primitive, check=check)


class EtpCollector(pytest.Collector):
  """The ``etp`` node: a node per primitive (so that node ids are
  ``::etp::<primitive>::<check>``, one name per ``::`` segment, as pytest's
  ``--lf``/``--ff``/``--sw`` parse them back)."""

  def collect(self):
    pairs, _ = selected(self.config)
    checks = {}
    for prim, check in pairs:
      checks.setdefault(prim, []).append(check)
    for prim, names in checks.items():
      yield EtpPrimitiveCollector.from_parent(self, name=prim.name,
                                              primitive=prim, checks=names)


def battery_items(session):
  collector = EtpCollector.from_parent(session, name='etp')
  return [item for node in collector.collect() for item in node.collect()]


class EtpCheckPlugin:
  """Collection, summary and report for ``--etp-check``."""

  def __init__(self, config):
    self.config = config
    self.results = {}
    self.failures = []
    self.unchecked = []
    self.start = time.perf_counter()
    self.compile_cache = None
    take_node_id_args(config)

  @pytest.hookimpl(tryfirst=True)
  def pytest_collection(self, session):
    if session.config.option.file_or_dir:
      return None  # paths given: normal collection, battery added below
    config = session.config
    items = battery_items(session)
    # Reported like a collected module, so "collected N items" counts them.
    config.hook.pytest_collectreport(report=pytest.CollectReport(
        'etp', 'passed', None, list(items)))
    config.hook.pytest_collection_modifyitems(session=session, config=config,
                                              items=items)
    session.items = items
    session.testscollected = len(items)
    config.hook.pytest_collection_finish(session=session)
    return True

  @pytest.hookimpl(trylast=True)
  def pytest_collection_modifyitems(self, session, config, items):
    if config.option.file_or_dir and not any(
        isinstance(i, EtpCheckItem) for i in items):
      items.extend(battery_items(session))
    _, self.unchecked = selected(config)

  def pytest_sessionstart(self, session):
    try:
      self.compile_cache = configure_compile_cache(session.config)
    except OSError as e:   # a usage error, not pytest's INTERNALERROR
      raise pytest.UsageError(f'--etp-compile-cache: {e}') from None

  def pytest_runtest_logreport(self, report):
    for key, value in report.user_properties:
      if key == RESULT_KEY and report.when == 'call' or (
          key == RESULT_KEY and report.when == 'setup'):
        record = json.loads(value)
        self.results[(record['primitive'], record['check'])] = record
        if record['status'] in ('failed', 'error'):
          self.failures.append(record)

  def pytest_terminal_summary(self, terminalreporter, exitstatus):
    if exitstatus == pytest.ExitCode.USAGE_ERROR:
      return   # nothing ran: the error says why, no empty matrix above it
    from etp_testing._src import compilations, matrix
    from etp_testing._src.checks import registry as check_registry
    tr = terminalreporter
    tr.section('etp rule checks')
    cells = {k: (r['status'], r.get('max_rel_err'))
             for k, r in self.results.items()}
    tr.write_line(matrix.render(cells, check_registry.check_names()))
    if self.unchecked:
      tr.write_line('no strategy (not checked): ' + ', '.join(self.unchecked)
                    + ' - register one with etp_testing.register_strategy')
    # pytest's FAILURES section shows each message in full, snippet and
    # all, unless --tb=no; here each failure is listed without its snippet.
    in_full = self.config.getoption('tbstyle') == 'no'
    for record in self.failures:
      message = record.get('message', '')
      head, snippet, _ = message.partition('\nReproduce with:')
      if snippet and not in_full:
        message = head + '\n(the snippet that re-runs it: under FAILURES above)'
      tr.write_line('')
      word = 'FAILED' if record['status'] == 'failed' else 'ERROR'
      tr.write_line(f"{word} "
                    f"{item_label(record['primitive'], record['check'])}")
      tr.write_line(message)
    path = self.config.getoption('etp_report')
    compiled, loaded = compile_totals(self.results.values())
    tr.write_line(compilations.programs_line(compiled, loaded,
                                             self.compile_cache))
    if path:
      tr.write_line(f'etp report written to {path}')

  def pytest_sessionfinish(self, session):
    path = self.config.getoption('etp_report')
    if not path or hasattr(self.config, 'workerinput'):
      return
    compiled, loaded = compile_totals(self.results.values())
    data = report_file.document(
        self.results, seed=seed(self.config), examples=examples(self.config),
        duration_s=time.perf_counter() - self.start,
        compile_cache=self.compile_cache, compiled=compiled, loaded=loaded,
        unchecked=self.unchecked)
    with open(path, 'w') as f:
      json.dump(strict_json_data(data), f, indent=2, default=str)


class EtpCheckFixture:
  """The ``etp_check`` fixture: the battery inside a user's own test.

  ``etp_check(primitive, *operands, **params)`` runs
  ``assert_rule_consistent`` (a case on which every check skips is a
  skipped test); ``etp_check.hypothesis(primitive, **kwargs)``
  runs ``check_with_hypothesis``.
  """

  def __init__(self, request):
    self.request = request

  def __call__(self, primitive, *operands, **kwargs):
    import etp_testing
    try:
      return etp_testing.assert_rule_consistent(primitive, *operands,
                                                **kwargs)
    except etp_testing.NothingCheckedError as e:
      # Nothing proven is a skip, shown as one, never a pass.
      pytest.skip(str(e))

  def hypothesis(self, primitive, **kwargs):
    import etp_testing
    kwargs.setdefault('seed', seed(self.request.config))
    return etp_testing.check_with_hypothesis(primitive, **kwargs)
