"""fmsring.one_row_matmul: compiled with the pass (on CPU, where inductor compiles for real), a
one-row projection between an RMSNorm and a SiLU leaves no matmul in the generated code and gives
eager's values up to fp32 reassociation; two rows keep their matmul."""

from __future__ import annotations

import random

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from fmsring.one_row_matmul import OneRowMatmul


def _norm_project_silu(x: torch.Tensor, gain: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * gain
    return torch.nn.functional.silu(torch.nn.functional.linear(x, weight))


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("rows", [1, 2])
def test_one_row_projection_fuses_and_matches_eager(fresh_dynamo, rows):
    seed = random.randrange(2**31)
    torch.manual_seed(seed)
    dim, out = random.randrange(40, 90), random.randrange(50, 130)  # odd sizes: no tile divides them
    x, gain, weight = torch.randn(rows, 1, dim), torch.randn(dim), torch.randn(out, dim) / dim**0.5
    compiled = torch.compile(_norm_project_silu, options={"post_grad_custom_pre_pass": OneRowMatmul()})
    got, (code,) = run_and_get_code(compiled, x, gain, weight)
    assert ("extern_kernels.mm(" in code) == (rows > 1), f"seed {seed}"
    torch.testing.assert_close(got, _norm_project_silu(x, gain, weight), rtol=1e-5, atol=1e-5, msg=f"seed {seed}")
