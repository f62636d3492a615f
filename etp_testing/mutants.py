"""Deliberately broken ETP primitives: the catalog that proves the harness.

Each :class:`Mutant` is a real ETP primitive made from a built-in family's own
pieces with exactly one thing wrong, plus the record of what is wrong, which
checks must catch it, and a case that exposes it::

  from etp_testing import mutants, check_rules

  for m in mutants.catalog():
    operands, params = m.case()
    report = check_rules(m.primitive(), *operands, params=params)
    assert any(m.matches(o.name) for o in report.failures)

Importing this module registers nothing; :meth:`Mutant.primitive` registers a
mutant on first use, and :func:`forget_built` takes them all out of
``etp.primitives()`` again.  ``python -m etp_testing.selftest`` runs the whole
catalog and prints the kill matrix.
"""

from etp_testing._src.mutants import (NAME_PREFIX, Mutant, bug_classes, builtin,
                                      built, catalog, families, forget_built,
                                      get)

__all__ = ['NAME_PREFIX', 'Mutant', 'catalog', 'get', 'families',
           'bug_classes', 'builtin', 'built', 'forget_built']
