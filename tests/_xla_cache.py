"""JAX's persistent compilation cache, set for a block (``from _xla_cache
import xla_cache_in``): the suite's own cache and the tests about caches."""

import contextlib

import jax

# JAX's settings of its persistent compilation cache.
_CACHE_SETTINGS = ('jax_compilation_cache_dir',
                   'jax_persistent_cache_min_compile_time_secs',
                   'jax_persistent_cache_min_entry_size_bytes')


@contextlib.contextmanager
def xla_cache_in(directory):
  """JAX's persistent compilation cache in ``directory`` for the block,
  every program cached (``None``: no persistent cache); the old settings
  are restored after."""
  from jax.experimental.compilation_cache import compilation_cache
  old = {n: getattr(jax.config, n) for n in _CACHE_SETTINGS}
  jax.config.update('jax_compilation_cache_dir',
                    None if directory is None else str(directory))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  compilation_cache.reset_cache()
  try:
    yield directory
  finally:
    for n, v in old.items():
      jax.config.update(n, v)
    compilation_cache.reset_cache()
