"""Hypothesis strategies for ETP primitives (see ``etp_testing._src.strategies``)."""

from etp_testing._src.strategies import (SIZES, arrays_of, batch_sizes,
                                         conv_cases, conv_configs,
                                         dense_cases, dims, elemwise_cases,
                                         float_dtypes, lora_cases, lora_ranks,
                                         register_strategy,
                                         registered_primitives, sparse_cases,
                                         sparse_patterns, strategy_for)

__all__ = [
    'SIZES', 'dims', 'batch_sizes', 'float_dtypes', 'arrays_of',
    'sparse_patterns', 'conv_configs', 'lora_ranks', 'elemwise_cases',
    'dense_cases', 'sparse_cases', 'conv_cases', 'lora_cases',
    'register_strategy', 'strategy_for', 'registered_primitives',
]
