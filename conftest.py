"""Root pytest configuration.

Several XLA host devices are requested before JAX starts, so the multi-device
and sharding checks run on a CPU-only machine.  A caller's own XLA_FLAGS win.

Tests marked ``soak`` (the 10,000-example false-alarm soak) run only with the
``nightly`` hypothesis profile, or when ``-m`` names them (``pytest -m
soak``); every other run deselects them.
"""

import os

_DEVICES_FLAG = '--xla_force_host_platform_device_count'
if _DEVICES_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' {_DEVICES_FLAG}=4').strip()


def _soak_wanted(config) -> bool:
  return ('soak' in (config.getoption('markexpr', '') or '') or
          config.getoption('hypothesis_profile', None) == 'nightly')


def pytest_collection_modifyitems(config, items):
  if _soak_wanted(config):
    return
  soak = [item for item in items if item.get_closest_marker('soak')]
  if soak:
    config.hook.pytest_deselected(items=soak)
    items[:] = [item for item in items if item not in soak]
