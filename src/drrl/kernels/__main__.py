"""``python -m drrl.kernels``: build the CPU kernels now (``make install`` runs it) and say where they are."""

import sys

from drrl import kernels

if kernels.load() is None:
    print(f"drrl kernels: not built ({kernels._state.get('error')}); the PyTorch reference will serve", file=sys.stderr)
    sys.exit(1)
print(f"drrl kernels: built in {kernels.build_dir()}")
