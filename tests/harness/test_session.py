"""fmsring.harness.session and timing: a point's inputs, and one timed run of each phase."""

from __future__ import annotations

import random

import fms.models
import torch

from fmsring.harness import session, timing


def micro(**kwargs) -> torch.nn.Module:
    torch.manual_seed(random.randrange(2**31))
    return fms.models.get_model("llama", "micro", device_type="cpu", distributed_strategy="none", nlayers=2, **kwargs)


@torch.no_grad()
def test_left_padded_batch_decodes_each_prompt_as_if_alone():
    """The bench's padded batch (``--padding``), its mask and positions extended every step as
    FMS's generate extends them, gives each sequence the logits and greedy tokens of its own
    prompt decoded alone; without them the padded sequences' logits differ."""
    model = micro().eval()
    b, n, steps, fraction = 3, random.randint(12, 40), 4, random.uniform(0.3, 0.8)
    ids = torch.randint(1, 256, (b, n))
    padded, kwargs = session.left_pad(ids, fraction)
    kept = [n - round(fraction * n * i / (b - 1)) for i in range(b)]
    assert kept[0] == n and kept[-1] < n and (padded[-1, : n - kept[-1]] == 0).all()
    clock = timing.Clock(torch.device("cpu"))
    run = timing.greedy_decode(model, padded, steps, kwargs)(clock)
    # the drained steps timed, then the streamed ones as intervals between their ends (the first follows a drained step)
    assert len(run.spans) == steps and len(run.streamed) == steps - 1 and len(run.firsts) == 1
    assert all(end > start for start, end in run.spans + run.streamed) and run.streamed[0][0] > run.spans[-1][1]
    assert all(a[1] == b[0] for a, b in zip(run.streamed, run.streamed[1:]))  # back to back: intervals, no gaps
    assert run.logits.shape[:2] == (1 + 2 * steps, b) and run.tokens.shape == (b, 1 + 2 * steps)
    for i in range(b):
        alone = timing.greedy_decode(model, ids[i : i + 1, n - kept[i] :], steps)(clock)
        torch.testing.assert_close(run.logits[:, i], alone.logits[:, 0], rtol=1e-4, atol=1e-4)
        assert torch.equal(run.tokens[i], alone.tokens[0])
    unmasked = timing.greedy_decode(model, padded, steps)(clock).logits
    logits = run.logits
    assert (unmasked[0, -1] - logits[0, -1]).abs().max() > 1e-3  # what the mask is for
