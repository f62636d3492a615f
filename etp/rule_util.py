"""Helpers for writing ETP rules: the pieces the built-in rules are made of.

``init_drtrl`` and ``init_pp`` receive jaxpr variables; every helper here
also accepts anything with ``.shape`` and ``.dtype`` (an array, a
``jax.ShapeDtypeStruct``):

* :func:`weight_shaped_traces`: ``init_drtrl`` for weights whose every element
  reaches one output (dense, sparse, element-wise): zeros
  ``(*lead, *weight_shape, n_state)`` in the operands' ``result_type``;
* :func:`pp_trace`: ``init_pp``: zeros ``(*y_shape, n_state)`` in ``y``'s
  dtype;
* :func:`trace_dtype`, :func:`batch_lead`, :func:`aval`: the dtype, the batch
  axis and the abstract value those are built from;
* :func:`sum_leading`: sums a per-example gradient over its leading axes (an
  ``xy_to_dw`` of a batched primitive).
"""

from etp._src.rule_util import (aval, batch_lead, pp_trace, sum_leading,
                                trace_dtype, weight_shaped_traces)

__all__ = ['aval', 'batch_lead', 'pp_trace', 'sum_leading', 'trace_dtype',
           'weight_shaped_traces']
