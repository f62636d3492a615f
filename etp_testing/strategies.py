"""Hypothesis strategies for ETP primitives.

Pieces (each draws one thing): :func:`dims`, :func:`batch_sizes`,
:func:`float_dtypes`, :func:`operand_dtypes`, :func:`arrays_of`,
:func:`sparse_patterns`, :func:`nnz_buckets`, :func:`conv_configs`,
:func:`conv_layouts`, :func:`lora_ranks`.  Family strategies, each drawing
``(operands, params)``: :func:`elemwise_cases`, :func:`dense_cases`,
:func:`sparse_cases`, :func:`conv_cases`, :func:`lora_cases`.  Registry:
:func:`register_strategy`, :func:`strategy_for`,
:func:`registered_primitives` (every built-in primitive has its family's
strategy; :func:`builtin_strategy` gives it for other dtypes),
:func:`fixed_cases_for` (the cases every run checks before drawing; a
built-in's :func:`rich_case`).  See
``etp_testing._src.strategies`` for what each draws and which values it
avoids.
"""

from etp_testing._src.strategies import (DIM_BUCKETS, MAX_BATCH,
                                         MAX_CHANNELS, MAX_DIM,
                                         MAX_MAGNITUDE, MAX_RANK,
                                         MAX_SPATIAL, MAX_SPATIAL_3D,
                                         MIN_MAGNITUDE, SIZES, arrays_of,
                                         batch_sizes, builtin_strategy,
                                         conv_cases,
                                         conv_configs, conv_layouts,
                                         dense_cases, dims, elemwise_cases,
                                         float_dtypes, lora_cases,
                                         lora_ranks, nnz_buckets, np_dtype,
                                         operand_dtypes,
                                         fixed_cases_for, register_strategy,
                                         registered_primitives, rich_case,
                                         sparse_cases,
                                         sparse_patterns, strategy_for)

__all__ = [
    'DIM_BUCKETS', 'SIZES', 'MAX_DIM', 'MAX_BATCH', 'MAX_SPATIAL',
    'MAX_SPATIAL_3D', 'MAX_CHANNELS', 'MAX_RANK', 'MIN_MAGNITUDE',
    'MAX_MAGNITUDE',
    'dims', 'batch_sizes', 'float_dtypes', 'operand_dtypes', 'np_dtype',
    'arrays_of',
    'nnz_buckets', 'sparse_patterns', 'conv_layouts', 'conv_configs',
    'lora_ranks',
    'elemwise_cases', 'dense_cases', 'sparse_cases', 'conv_cases',
    'lora_cases',
    'register_strategy', 'strategy_for', 'registered_primitives',
    'builtin_strategy', 'fixed_cases_for', 'rich_case',
]
