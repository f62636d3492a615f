"""Root pytest configuration.

Several XLA host devices are requested before JAX starts, so the multi-device
and sharding checks run on a CPU-only machine.  A caller's own XLA_FLAGS win.
"""

import os

_DEVICES_FLAG = '--xla_force_host_platform_device_count'
if _DEVICES_FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                             f' {_DEVICES_FLAG}=4').strip()
