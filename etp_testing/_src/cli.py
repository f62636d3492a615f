"""``etp-check`` / ``python -m etp_testing``: the battery outside pytest.

Prints the same primitive x check matrix as ``pytest --etp-check``, and how
many XLA programs were compiled and how many loaded from the persistent
compilation cache (``--compile-cache``; by default
``$XDG_CACHE_HOME/etp_testing/xla``, ``~/.cache/etp_testing/xla`` without
it, so a second run of the same battery compiles nothing).  Exit status: 0
every check passed (skips allowed beside checks that ran), 1 a check
failed, 2 usage error (also code given by ``--import`` or ``--conftest``
that raised), 5 nothing was checked (no selected primitive has a strategy,
or every selected check skipped: a gate that proved nothing is not green;
pytest's "no tests collected" status).
"""

from __future__ import annotations

import argparse
import contextlib
import fnmatch
import importlib
import importlib.util
import json
import os
import sys
import time


def positive_int(text: str) -> int:
  """An argparse type: a whole number of at least 1 (hypothesis refuses
  fewer examples, in every item)."""
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise argparse.ArgumentTypeError(f'{text!r} is not a number >= 1')
  return value


def add_compile_cache_option(parser) -> None:
  """``--compile-cache DIR|auto|off``, as ``etp-check`` and the mutant
  selftest take it (see :func:`open_compile_cache`)."""
  parser.add_argument(
      '--compile-cache', default='auto', metavar='DIR',
      help="persistent XLA compilation cache: a directory, 'auto' (default: "
      "$XDG_CACHE_HOME/etp_testing/xla, or ~/.cache/etp_testing/xla) or "
      "'off'; a JAX cache directory already configured wins")


def open_compile_cache(choice: str, prog: str) -> "tuple[bool, str | None]":
  """``(ok, directory)``: the persistent compilation cache of
  ``--compile-cache choice`` in use (``directory``: ``None`` for none), or
  ``ok`` False, with the reason printed for ``prog``, where it cannot be
  made (a usage error)."""
  from etp_testing._src import compilations
  try:
    return True, compilations.use_persistent_cache(choice, default_cache_dir)
  except OSError as e:
    print(f'{prog}: --compile-cache: {e}', file=sys.stderr)
    return False, None


def _parser():
  p = argparse.ArgumentParser(
      prog='etp-check', description='Prove ETP primitives\' rules right on '
      'hypothesis-generated cases.')
  p.add_argument('--primitives', default=None, metavar='NAMES',
                 help='comma list of primitive names or glob patterns')
  p.add_argument('--checks', default=None, metavar='NAMES',
                 help='comma list of check names, groups or globs')
  p.add_argument('--examples', type=positive_int, default=3, metavar='N',
                 help='hypothesis examples per primitive (default 3)')
  p.add_argument('--devices', default='all', choices=('cpu', 'gpu', 'all'),
                 help='devices for device.consistency (default: all)')
  p.add_argument('--report', default=None, metavar='PATH',
                 help='write a JSON report')
  p.add_argument('--fast', action='store_true',
                 help='random-projection mode everywhere')
  p.add_argument('--seed', type=int, default=0,
                 help="hypothesis's seed, so the draws are reproducible, and "
                 "the harness's seed for every example (default 0)")
  add_compile_cache_option(p)
  p.add_argument('--import', dest='imports', action='append', default=[],
                 metavar='MODULE', help='import MODULE first (it registers '
                 'primitives and strategies); repeatable')
  p.add_argument('--conftest', action='append', default=[], metavar='PATH',
                 help='execute a conftest.py-like file first; repeatable')
  p.add_argument('--list', action='store_true',
                 help='list primitives (with/without strategy) and checks')
  return p


def _load(args):
  if args.imports and os.getcwd() not in sys.path and '' not in sys.path:
    # As under ``python -m``: the console script's sys.path starts at its
    # own directory, and --import names the user's module where they are.
    sys.path.insert(0, os.getcwd())
  for name in args.imports:
    with _user_code(f'--import {name}'):
      importlib.import_module(name)
  for i, path in enumerate(args.conftest):
    name = f'etp_conftest_{i}'
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module   # as an import would (pickle, dataclasses)
    with _user_code(f'--conftest {path}'):
      spec.loader.exec_module(module)


class LoadError(Exception):
  """Code named by ``--import`` or ``--conftest`` raised (a usage error:
  nothing of the battery ran)."""


@contextlib.contextmanager
def _user_code(what: str):
  """Turns an exception raised by the user's code (a ``NameError`` in a
  conftest, a ``SyntaxError`` in a module) into a :class:`LoadError` that
  names the option and where it was raised, instead of a traceback that
  reads like the harness's own failure.  A missing module or file stays
  what it is (``ImportError`` / ``OSError``, reported as such)."""
  from etp_testing._src.errors import describe_exception
  try:
    yield
  except (ModuleNotFoundError, FileNotFoundError):
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise LoadError(f'{what} raised ' + describe_exception(e)) from e


def unmatched_primitives(patterns, names) -> "str | None":
  """Why ``patterns`` (primitive names or globs) do not all select from
  ``names``: ``"no primitive matches 'x'; known primitives: ..."`` for the
  first that matches none, or ``None``.  A typo beside a right name is an
  error, here and for ``pytest --etp-primitives``."""
  for pattern in patterns:
    if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
      return (f'no primitive matches {pattern!r}; known primitives: '
              + ', '.join(names))
  return None


def default_cache_dir() -> str:
  """``$XDG_CACHE_HOME/etp_testing/xla``, or ``~/.cache/etp_testing/xla``."""
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(
      os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'etp_testing', 'xla')


def main(argv=None) -> int:
  args = _parser().parse_args(argv)
  import etp
  import etp_testing
  from etp_testing._src import (compilations, matrix, report_file,
                                strategies)
  from etp_testing._src import report as report_mod
  from etp_testing._src.errors import PREFIX, describe_exception
  from etp_testing._src.checks import registry as check_registry
  try:
    _load(args)
    checks = check_registry.select(
        [c for c in (args.checks or '').split(',') if c.strip()] or 'all')
  except (ImportError, OSError, ValueError, LoadError) as e:
    print(f'etp-check: {e}', file=sys.stderr)
    return 2
  patterns = [p.strip() for p in (args.primitives or '').split(',') if p.strip()]
  unmatched = unmatched_primitives(patterns,
                                   [p.name for p in etp.primitives()])
  if unmatched:
    print(f'etp-check: --primitives: {unmatched}', file=sys.stderr)
    return 2
  prims = [p for p in etp.primitives()
           if not patterns or any(fnmatch.fnmatchcase(p.name, pat)
                                  for pat in patterns)]
  if args.list:
    for p in etp.primitives():
      has = ('strategy' if strategies.strategy_for(p) is not None
             else 'no strategy')
      print(f'{p.name:20} {has}')
    print('checks: ' + ', '.join(check_registry.check_names()))
    return 0
  ok, cache = open_compile_cache(args.compile_cache, 'etp-check')
  if not ok:
    return 2
  results, failures, unchecked, records = {}, [], [], {}
  start = time.perf_counter()
  with compilations.counting() as programs:
    for prim in prims:
      if strategies.strategy_for(prim) is None:
        unchecked.append(prim.name)
        continue
      warned = []
      try:
        with report_file.recording_warnings() as warned:
          summary = etp_testing.check_with_hypothesis(
              prim, max_examples=args.examples, checks=checks,
              seed=args.seed, devices=args.devices,
              fast=True if args.fast else None)
      except Exception as e:  # pylint: disable=broad-except
        # A rule failure (failed cells), or a strategy's or the harness's
        # own error (error cells): noted, and on to the next primitive.
        failures.append(
            str(e) if isinstance(e, etp_testing.RuleConsistencyError) else
            f'{PREFIX}{prim.name}: checking it raised '
            + describe_exception(e))
        found = report_file.failure_records(e, checks, args.seed,
                                            args.examples)
      else:
        found = report_file.summary_records(summary, args.seed)
      for name, record in found.items():
        records[(prim.name, name)] = {**record, 'warnings': warned}
        results[(prim.name, name)] = (record['status'],
                                      record.get('max_rel_err'))
  print(matrix.render(results, check_registry.check_names()))
  if unchecked:
    print('no strategy (not checked): ' + ', '.join(unchecked))
  for message in failures:   # blank lines around: a snippet ends a message
    print()
    print(message)
  if failures:
    print()
  print(compilations.programs_line(programs.count, programs.loaded, cache))
  print(f'{time.perf_counter() - start:.1f} s')
  if args.report:
    # pytest --etp-report's document, and the failures' messages in full.
    data = report_file.document(
        records, seed=args.seed, examples=args.examples,
        duration_s=time.perf_counter() - start, compile_cache=cache,
        compiled=programs.count, loaded=programs.loaded, unchecked=unchecked,
        failures=failures)
    with open(args.report, 'w') as f:
      json.dump(report_mod.strict_json_data(data), f, indent=2,
                default=str)
  if failures:
    return 1
  if not any(status != 'skipped' for status, _ in results.values()):
    print('etp-check: nothing was checked (' + (
        'every selected check skipped' if results else
        'no selected primitive has a strategy') + '): exit status 5',
          file=sys.stderr)
    return 5
  return 0


if __name__ == '__main__':
  sys.exit(main())
