"""GPU checks (skipped without CUDA): the narrow q/k path runs on a fused backend and stays exact."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from drrl.attention.drrl import kernel_path
from tests.attention.test_drrl import calibrate, make, naive, qkv

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_narrow_path_on_efficient_and_cudnn_backends_matches_reference():
    m = calibrate(make("calibrated", "fixed", rank=8)).float().cuda()
    q, k, v = (x.float().cuda() for x in qkv(L=64))
    assert kernel_path("cuda", 8, 16) == "sdpa-narrow"
    for backend in (SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION):
        with sdpa_kernel([backend]):
            try:
                y = m.attend(q, k, v)
            except RuntimeError as e:  # a backend unavailable for this build/GPU
                pytest.skip(f"{backend} unavailable: {e}")
        assert m.last_plan.path == "sdpa-narrow"
        ref = naive(m, q.double(), k.double(), v.double())
        torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)


def test_flash_backend_refuses_narrow_qk_so_drrl_never_asks_it():
    q = torch.randn(1, 2, 64, 8, device="cuda", dtype=torch.bfloat16)
    v = torch.randn(1, 2, 64, 16, device="cuda", dtype=torch.bfloat16)
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError):
        torch.nn.functional.scaled_dot_product_attention(q, q, v, is_causal=True)


def test_online_mode_on_gpu_matches_reference():
    m = make("online", "energy").float().cuda().eval()
    q, k, v = (x.float().cuda() for x in qkv(L=64))
    y = m.attend(q, k, v)
    ref = naive(m, q.double(), k.double(), v.double())
    torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-3)
