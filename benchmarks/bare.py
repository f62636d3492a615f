"""What every benchmark ratio is taken against, and how it is timed.

The bare cost of a primitive on a case is one jitted forward plus one VJP
w.r.t. its trainable operands (the forward alone where it has none), with
every operand already on the device and at JAX's default precision, as a
user trains (TF32 products on a GPU): the least a training step on the
layer can cost.  Timings are the best of interleaved rounds
(:func:`best_interleaved`), so every figure of a ratio sees the same spells
of a drifting machine.
"""

from __future__ import annotations

import time

# Every timing that goes into a ratio is the best of at least this many
# runs, the same on both sides (a shared machine's speed drifts from run to
# run) ...
REPEAT = 20
# ... and of more, while the rounds have taken under this many seconds, up
# to MAX_ROUNDS: a call of a millisecond or less on a GPU machine needs
# hundreds to reach its floor (the H200's LoRA fast-mode call: 0.80 ms as
# the best of 20, 0.62 ms as the best of 300 in another process).  On the
# 2-core CPU a large layer's round takes 0.1 s or more: 20 rounds, as before.
ROUNDS_BUDGET_S = 3.0
MAX_ROUNDS = 500


def forward_vjp(prim, operands, params):
  """A function running one jitted forward plus one VJP of ``prim`` on
  ``operands`` (compiled by its first call), operands on the device."""
  import jax
  import numpy as np
  from etp_testing._src import executor
  index = prim.trainable_invars(params)

  def fwd_vjp(ops, g):
    weights = {k: ops[i] for k, i in index.items()}
    y, vjp = jax.vjp(lambda w: executor.bind_y(
        prim, executor.with_weights(prim, ops, params, w), params), weights)
    return y, vjp(g)

  y = jax.eval_shape(lambda: executor.bind_y(prim, operands, params))
  ops, g = jax.device_put((list(operands), np.ones(y.shape, y.dtype)))
  run = jax.jit(fwd_vjp)
  return lambda: jax.block_until_ready(run(ops, g))


def seconds(prim, operands, params) -> float:
  """The bare cost on its own: the best time of :func:`forward_vjp`."""
  return best_interleaved({'bare': forward_vjp(prim, operands, params)})[
      'bare']


def best_interleaved(fns: dict) -> dict:
  """Best seconds of each function over interleaved rounds (one call of
  each per round; ``REPEAT`` rounds, then more within ``ROUNDS_BUDGET_S``,
  at most ``MAX_ROUNDS``), after one warm-up call each."""
  for fn in fns.values():
    fn()
  best = {k: float('inf') for k in fns}
  start, rounds = time.perf_counter(), 0
  while rounds < REPEAT or (rounds < MAX_ROUNDS and
                            time.perf_counter() - start < ROUNDS_BUDGET_S):
    for k, fn in fns.items():
      best[k] = min(best[k], timed(fn))
    rounds += 1
  return best


def timed(fn) -> float:
  """Seconds one call of ``fn`` takes."""
  t = time.perf_counter()
  fn()
  return time.perf_counter() - t
