"""Ring x tensor parallel on one (cp, tp) mesh, on real gloo ranks.

References: HF transformers and the unsharded FMS model on the tiny
checkpoints (4 heads; kv-heads 4 or 2, so TP 4 on the GQA one replicates
kv-heads), fp32 <= 1e-4. Every factorisation of 4 ranks (4x1 through a
mesh, 2x2, 1x4) and 3x2 on 6 ranks; both layouts; odd lengths; left-padded
batches; a follow-up and a decode step on the sharded cache.
"""

from __future__ import annotations

import json
import random
import subprocess

import pytest
import torch

from tests.distributed import run_ranks
from tests.test_model import _generate, hf_padded_logits, reference_tokens
from tests.tiny_checkpoint import VOCAB, fms_model, hf_model


def _mesh_errors(rank, world, ckpts, tps, inputs, prompts, split):
    """Every max abs error against HF and unsharded FMS, per (checkpoint, tp, layout, case)."""
    from fms.utils.generation import pad_input_ids
    from torch.distributed.device_mesh import init_device_mesh

    from fmsring.layout import LAYOUTS

    errs = {}
    for kind, path in ckpts.items():
        hf, ref = hf_model(path), fms_model(path)
        for tp in tps:
            for layout in LAYOUTS:
                if tp == 1:  # a user's mesh with a TP dimension of 1: the ring over every rank
                    mesh = init_device_mesh("cpu", (world, 1), mesh_dim_names=("cp", "tp"))
                    ring = fms_model(path, torch.float32, "ring", ring_layout=layout, ring_mesh=mesh)
                else:
                    ring = fms_model(path, torch.float32, "ring", ring_layout=layout, ring_tp=tp)
                key = (kind, tp, layout)
                with torch.no_grad():
                    for x in inputs:
                        want = hf(x).logits
                        errs[key + (tuple(x.shape),)] = (ring(x) - want).abs().max().item()
                        errs[key + ("fms", tuple(x.shape))] = (ring(x) - ref(x, use_cache=True)[0]).abs().max().item()
                    ids, kw = pad_input_ids(prompts)
                    got = ring(ids, **kw)
                    errs[key + ("padded",)] = max(
                        (got[i, -len(p) :] - w).abs().max().item()
                        for i, (p, w) in enumerate(zip(prompts, hf_padded_logits(hf, prompts), strict=True))
                    )
                    x = inputs[-1]  # the cache: a prefill, a follow-up of several tokens, one decode step
                    want = hf(x).logits
                    head, cache = ring(x[:, :split], use_cache=True)
                    mid, cache = ring(x[:, split:-1], past_key_value_states=cache, use_cache=True)
                    last, cache = ring(x[:, -1:], past_key_value_states=cache, use_cache=True)
                    errs[key + ("cache",)] = (torch.cat([head, mid, last], dim=1) - want).abs().max().item()
    return errs


def _inputs(world):
    lengths = sorted({world + 1, 2 * world + 1, random.randrange(9, 40) | 1})
    inputs = [torch.randint(0, VOCAB, (1 + i % 2, n)) for i, n in enumerate(lengths)]
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (random.randrange(world + 3, 30), random.randrange(2, 12))]
    return inputs, prompts, random.randrange(world, lengths[-1] - world)


def _mesh_errors_then_bad_tp(rank, world, *args):
    """As :func:`_mesh_errors`, then a TP size that divides the world but not the 4 heads."""
    errs = _mesh_errors(rank, world, *args)
    try:
        fms_model(args[0]["mha"], torch.float32, "ring", ring_tp=3)
    except ValueError as exc:
        return errs, str(exc)
    return errs, ""


@pytest.mark.parametrize(
    "world,tps",
    [(4, (1, 2, 4)), pytest.param(6, (2,), marks=pytest.mark.slow)],  # fast: six ranks as 2 x 3, test_readme's mesh CLI
)
def test_every_factorisation_matches_hf_and_unsharded_fms(world, tps, checkpoints):
    inputs, prompts, split = _inputs(world)
    res = run_ranks(world, _mesh_errors_then_bad_tp, checkpoints, tps, inputs, prompts, split)
    errs = [e for e, _ in res]
    assert len(errs[0]) == 2 * len(tps) * 2 * (2 * len(inputs) + 2)
    for rank_errs in errs:
        for key, e in rank_errs.items():
            assert e <= 1e-4, (key, e)
    assert all(e == errs[0] for e in errs), "ranks returned different logits"
    for _, msg in res:  # every rank refuses alike: 4 ranks are not 3 x anything, 6 are but 4 heads are not
        if world == 4:
            assert "does not divide the world size 4" in msg and "ring_tp values that do: 1, 2, 4" in msg, msg
        else:
            assert "ring_tp=3: " in msg and "has 4 attention heads and 4 kv-heads" in msg, msg
            assert msg.endswith("ring_tp values that divide both the world (6) and the heads: 1, 2"), msg


def test_greedy_and_sampled_generation_on_a_2x2_mesh(checkpoints):
    """Greedy tokens are HF's (with and without the cache, alone and left-padded); sampled
    tokens agree on every rank of the mesh although every rank seeds its own stream."""
    from fms.utils.generation import pad_input_ids

    path, n_new = checkpoints["gqa"], 9
    prompts = [torch.randint(0, VOCAB, (n,)) for n in (random.randrange(5, 30), random.randrange(2, 9))]
    ids, kw = pad_input_ids(prompts)
    hf_tok, _ = reference_tokens(path, prompts, n_new)
    greedy = run_ranks(4, _generate, path, ids, kw, n_new, False, {"ring_tp": 2})
    sampled = run_ranks(4, _generate, path, ids, kw, n_new, True, {"ring_tp": 2})
    for rank in range(4):
        for key in greedy[rank]:
            assert torch.equal(greedy[rank][key], hf_tok), (rank, key)
            assert torch.equal(sampled[rank][key], sampled[0][key]), (rank, key)


def _shards_and_errors(rank, world, path):
    import fmsring

    out = {}
    full = fms_model(path)
    layer_params = sum(p.numel() for p in full.base_model.layers.parameters())
    for tp in (2, 4):
        ring = fms_model(path, torch.float32, "ring", ring_tp=tp)
        out[tp] = sum(p.numel() for p in ring.model.base_model.layers.parameters()) / layer_params
    torch.manual_seed(rank)  # random weights, every rank seeded differently: shards agree over the ring
    model = fmsring.get_model("llama", "micro", distributed_strategy="ring", ring_tp=2, nlayers=2, kvheads=2)
    ids = torch.randint(0, 256, (1, 23), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        out["logits"] = model(ids)
    out["checksum"] = sum(p.double().sum().item() for p in model.parameters())
    problems = {}
    for kwargs in (
        {"ring_tp": 3},  # does not divide 4 ranks
        {"ring_tp": 0},
        {"ring_tp": 2, "distributed_strategy": "replicated"},
        {"ring_mesh": "2x2"},
    ):
        args = {"distributed_strategy": "ring", **kwargs}
        try:
            fmsring.get_model("hf_pretrained", model_path=path, **args)
        except ValueError as exc:
            problems[str(kwargs)] = str(exc)
    x = torch.randint(0, VOCAB, (1, 9))
    ring = fms_model(path, torch.float32, "ring", ring_tp=2)
    try:  # one rank of the mesh given another prompt: every rank must refuse, none may hang
        ring(x if rank != 3 else x.flip(1))
    except ValueError as exc:
        problems["inputs"] = str(exc)
    return out, problems


def test_weights_shard_over_tp_random_init_agrees_over_the_ring_and_bad_meshes_are_refused(checkpoints):
    res = run_ranks(4, _shards_and_errors, checkpoints["mha"])
    for rank, (out, problems) in enumerate(res):
        assert 1 / 2 <= out[2] <= 1.01 / 2 and 1 / 4 <= out[4] <= 1.01 / 4, out  # 1/T, plus replicated norms
        assert torch.equal(out["logits"], res[0][0]["logits"])
        assert out["checksum"] == res[rank % 2][0]["checksum"]  # rank r holds the shard of rank r % 2
        assert "does not divide the world size 4" in problems["{'ring_tp': 3}"]
        assert "positive integer" in problems["{'ring_tp': 0}"]
        assert "need distributed_strategy='ring'" in problems["{'ring_tp': 2, 'distributed_strategy': 'replicated'}"]
        assert "DeviceMesh with dims named" in problems["{'ring_mesh': '2x2'}"]
        assert "ranks were given different inputs" in problems["inputs"], rank


NODE_SCRIPT = """
import json, os, sys
import torch, torch.distributed as dist
import fmsring
from tests.tiny_checkpoint import hf_model

path, ids_file, out_dir = sys.argv[1:4]
fmsring.maybe_init_dist("cpu")
ids = torch.load(ids_file)
model = fmsring.get_model("hf_pretrained", model_path=path, distributed_strategy="ring", ring_tp=2)
with torch.no_grad():
    err = (model(ids) - hf_model(path)(ids).logits).abs().max().item()
nodes = [None] * 2
dist.all_gather_object(nodes, os.environ["GROUP_RANK"], group=model.strategy.tp_group)
with open(f"{out_dir}/{dist.get_rank()}.json", "w") as fh:
    json.dump({"err": err, "tp_group_nodes": nodes, "ring": model.strategy.world_size}, fh)
dist.destroy_process_group()
"""


@pytest.mark.slow  # fast: a 2x2 mesh's contiguous TP groups in one torchrun (test_mesh_cli, the 2x2 mesh tests)
def test_two_torchrun_nodes_run_tp_inside_a_node_and_the_ring_across(checkpoints, tmp_path):
    """Two torchrun agents ("nodes") of 2 processes each, meeting through a c10d rendezvous as
    Slurm's launch does: cp=2 x tp=2, every TP group on one node, logits HF's."""
    from fmsring.harness.launch import child_env, torchrun_command
    from tests.distributed import free_port

    script, ids_file = tmp_path / "node.py", tmp_path / "ids.pt"
    script.write_text(NODE_SCRIPT)
    torch.save(torch.randint(0, VOCAB, (2, random.randrange(9, 40) | 1)), ids_file)
    endpoint = f"127.0.0.1:{free_port()}"
    env = child_env({"OMP_NUM_THREADS": "1"})
    nodes = [
        subprocess.Popen(
            torchrun_command(2, nnodes=2, rdzv_endpoint=endpoint, rdzv_id="mesh-test", node_rank=n)
            + [str(script), checkpoints["gqa"], str(ids_file), str(tmp_path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for n in range(2)
    ]
    logs = [p.communicate(timeout=300)[0] for p in nodes]
    assert all(p.returncode == 0 for p in nodes), logs
    results = [json.loads((tmp_path / f"{r}.json").read_text()) for r in range(4)]
    for r in results:
        assert r["err"] <= 1e-4 and r["ring"] == 2, r
        assert len(set(r["tp_group_nodes"])) == 1, r  # a TP group never spans two nodes
