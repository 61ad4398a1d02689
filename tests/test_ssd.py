"""Mamba2's chunked scan (:mod:`fmsring.ssd`) against the recurrence it computes, token by token,
and against FMS's own scan on the same inputs."""

from __future__ import annotations

import random

import pytest
import torch

from fmsring.ssd import chunked_scan


def _inputs(gen: torch.Generator, n: int, heads: int = 6, groups: int = 2, head_dim: int = 4, state: int = 5):
    x = torch.randn(2, n, heads, head_dim, generator=gen)
    dt = torch.rand(2, n, heads, generator=gen) * 0.5
    A = -torch.rand(heads, generator=gen) * 2 - 0.1
    B, C = (torch.randn(2, n, groups, state, generator=gen) for _ in "BC")
    return x, dt, A, B, C


def _recurrence(x, dt, A, B, C):
    """h_t = exp(A dt_t) h_{t-1} + dt_t B_t x_t, y_t = C_t . h_t, in float64, one token at a time."""
    b, n, h, p = x.shape
    r = h // B.shape[2]
    Bh, Ch = (t.double().repeat_interleave(r, dim=2) for t in (B, C))
    state = torch.zeros(b, h, p, B.shape[-1], dtype=torch.float64)
    ys = []
    for t in range(n):
        step = (A.double() * dt[:, t].double()).exp()[..., None, None]
        state = step * state + (dt[:, t].double()[..., None] * x[:, t].double())[..., None] * Bh[:, t, :, None]
        ys.append(torch.einsum("bhpn,bhn->bhp", state, Ch[:, t]))
    return torch.stack(ys, dim=1), state


@pytest.mark.parametrize("chunk", [1, 4, 7, 64])
def test_the_chunked_scan_is_the_recurrence(chunk):
    """Outputs, final state and decays at lengths shorter than a chunk, a whole number of chunks and
    odd ones, groups shared by several heads; a chunk boundary moved by one still agrees."""
    seed = random.randrange(2**31)
    gen = torch.Generator().manual_seed(seed)
    n = random.choice([1, chunk, 3 * chunk, int(torch.randint(2, 150, (), generator=gen))])
    x, dt, A, B, C = _inputs(gen, n)
    y, state, decay = chunked_scan(x, dt, A, B, C, chunk)
    want_y, want_state = _recurrence(x, dt, A, B, C)
    msg = f"seed {seed}, n {n}, chunk {chunk}"
    torch.testing.assert_close(y.double(), want_y, rtol=1e-4, atol=1e-4, msg=msg)
    torch.testing.assert_close(state.double(), want_state, rtol=1e-4, atol=1e-4, msg=msg)
    torch.testing.assert_close(decay, (A * dt).cumsum(1), msg=msg)


def test_a_broken_scan_is_caught():
    """The same comparison fails when the states are not passed between chunks."""
    gen = torch.Generator().manual_seed(random.randrange(2**31))
    x, dt, A, B, C = _inputs(gen, 40)
    want_y, _ = _recurrence(x, dt, A, B, C)
    alone = torch.cat([chunked_scan(*(t[:, i : i + 8] for t in (x, dt)), A, B[:, i : i + 8], C[:, i : i + 8], 8)[0]
                       for i in range(0, 40, 8)], dim=1)  # fmt: skip
    assert (alone.double() - want_y).abs().max() > 1e-2


def test_fms_scan_gives_the_same_layer_output():
    """FMS's SSM forward (its naive scan) and the ring's segment run at world 1 agree in float32."""
    from fms.modules.ssm import SSM

    from fmsring import ssm

    torch.manual_seed(random.randrange(2**31))
    layer = SSM(nheads=8, emb_dim=16, state_size=6, conv_kernel=4, expand=2.0, use_bias=False, use_conv_bias=True,
                activation_fn="silu", norm_eps=1e-5, n_groups=2, head_dim=4, chunk_size=16)  # fmt: skip
    for p in layer.parameters():
        p.data.normal_(0, 0.3)
    x = torch.randn(2, 53, 16)
    with torch.no_grad():
        want, _ = SSM.forward(layer, x, None)
        run = ssm._run_segment(layer, x, torch.zeros(2, layer.conv_dim, 3))
        got = layer.out_proj(layer.norm(run.y, run.gate))
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
