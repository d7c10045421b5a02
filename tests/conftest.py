"""Every in-process test sees 8 fake CPU devices, so sharding is exercised for real.

Tests that need a different device count (1-device resume) run `launch.py` in a subprocess.
"""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
