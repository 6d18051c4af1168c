import sys

import pytest
import torch

from drrl.utils import set_heap_allocation


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_heap_allocation_switches_on_and_off():
    """The speed-up itself is measured by benchmarks/cpu_allocator.py (page faults depend on the kernel)."""
    try:
        assert set_heap_allocation(True) is True
        t = torch.ones(32 << 20)  # 128 MB from the heap now
        assert float(t.sum()) == 32 << 20
        del t
    finally:
        assert set_heap_allocation(False) is True
