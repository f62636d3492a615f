"""Errors raised by the harness.  Every message starts with ``[etp_testing]``."""

from __future__ import annotations

PREFIX = '[etp_testing] '


class RuleConsistencyError(AssertionError):
  """An ETP primitive failed one or more checks.

  The first line names the primitive and the failed checks; the body lists
  each failure with the rule, the weight key, the errors and where they occur,
  the shapes and dtypes, and a snippet that re-runs the failing case.  The full
  :class:`etp_testing.ConsistencyReport` is on ``.report``.
  """

  def __init__(self, message: str, report):
    super().__init__(message)
    self.report = report


class NothingCheckedError(RuleConsistencyError):
  """Every check selected for a case was skipped: nothing was proven.

  Not a failure of any rule, but not a pass either (a primitive with no
  trainable operand asked only for ``xy_to_dw``, or ``device.consistency``
  on one device with nothing pinned).  The message lists each check with
  the reason it was skipped; ``.report`` holds the report.  The pytest
  ``etp_check`` fixture turns it into a skip.
  """


class CheckSkipped(Exception):
  """Raised inside a check that cannot run here; the reason is reported."""


class RuleFailure(Exception):
  """Raised inside a check for a structural failure (wrong keys, a raising rule).

  Attributes name the rule and key, so the report can say exactly what broke.
  """

  def __init__(self, rule: str, message: str, key=None):
    super().__init__(message)
    self.rule = rule
    self.key = key
    self.message = message
