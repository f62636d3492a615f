"""Cases the tests share, importable by name (``from _cases import ...``)."""

import hypothesis

import etp_testing


def first_case(prim) -> tuple:
  """``(operands, params)``: the simplest case hypothesis draws for
  ``prim`` from its registered strategy (shrunk, so the same every run)."""
  return hypothesis.find(etp_testing.strategy_for(prim), lambda _: True)
