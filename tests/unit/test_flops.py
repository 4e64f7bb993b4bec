"""portrait.flops counts CPU scaled-dot-product attention (torch's counter alone reports 0 for it)."""

import torch
import torch.nn.functional as F

from portrait.flops import count_flops


def test_cpu_sdpa_is_counted_like_two_matmuls():
    q, k, v = torch.randn(2, 4, 16, 8), torch.randn(2, 4, 24, 8), torch.randn(2, 4, 24, 8)
    n = count_flops(lambda: F.scaled_dot_product_attention(q, k, v))
    explicit = count_flops(lambda: torch.softmax(q @ k.transpose(-1, -2) / 8**0.5, -1) @ v)
    assert n.total == 2 * (2 * 4 * 16 * 24 * 8) * 2  # QK^T and PV, 2 FLOPs per multiply-add
    assert n.total == explicit.total
    assert n.macs == n.total / 2


def test_module_breakdown_names_children():
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    n = count_flops(lambda: net(torch.randn(3, 8)), module=net)
    assert n.total == 2 * 3 * (8 * 16 + 16 * 4)
    assert n.by_module["Sequential.0"] == 2 * 3 * 8 * 16
