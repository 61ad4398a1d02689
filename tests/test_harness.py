"""fmsring.harness units, no processes: the schema (points, CSV round trip, tolerances),
FLOP counts and floors from given rates, the logits comparison, and the follow-up mask."""

from __future__ import annotations

import math
import random
from pathlib import Path

import fms.models
import pytest
import torch

from fmsring.harness import ceilings, peers, schema, session, timing
from fmsring.harness.exactness import compare
from fmsring.harness.flops import FlopShape, Rates, floor_ms, flop_shape, model_flops

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")


def micro(**kwargs) -> torch.nn.Module:
    torch.manual_seed(random.randrange(2**31))
    return fms.models.get_model("llama", "micro", device_type="cpu", distributed_strategy="none", nlayers=2, **kwargs)


# ---------------------------------------------------------------------------- schema


def test_seq_lens_parse_like_papers():
    assert schema.parse_seq_lens("8K, 128k,100") == [8192, 131072, 100]
    assert schema.parse_seq_lens([64, "1M"]) == [64, 1 << 20] and schema.parse_seq_lens("") == []
    for bad in ("0", "-4", "8G", "x"):
        with pytest.raises(ValueError, match="positive integer"):
            schema.parse_seq_len(bad)


def test_planned_points_for_followup_and_variants():
    pts = schema.planned_points("ring", 2, ["", "eager"], [3, 5], ["prefill", "followup"], [24], True)
    prefill = [(p.variant, p.seq_len) for p in pts if p.phase == "prefill"]
    # prefill of 3 and 5, then the follow-ups on 24, then the fresh prefills of 24+3 and 24+5
    assert prefill == [("", 3), ("", 5), ("", 27), ("", 29), ("eager", 3), ("eager", 5), ("eager", 27), ("eager", 29)]
    assert {(p.seq_len, p.cached_len) for p in pts if p.phase == "followup"} == {(3, 24), (5, 24)}
    # a P+T the prefill phase measures anyway is not measured twice; peers never recompute
    again = schema.planned_points("ring", 2, [""], [4, 28], ["prefill", "followup"], [24], True)
    assert sorted(p.seq_len for p in again if p.phase == "prefill") == [4, 28, 52]
    assert all(p.phase != "prefill" for p in schema.planned_points("tp", 2, [""], [3], ["followup"], [24], True))
    assert schema.variant_labels("single", {"": {}}, {}, True) == ["", schema.AS_SHIPPED]
    assert schema.variant_labels("ring", {"": {}, "x": {}}, {"ring_fuse": False}, True) == [
        '{"ring_fuse": false}',
        'x {"ring_fuse": false}',
    ]


def test_ring_variants_are_checked():
    assert schema.parse_ring_variants('{"": {}, "eager": {"ring_cuda_graphs": false}}')["eager"] == {
        "ring_cuda_graphs": False
    }
    for bad in ('{"a": {"ring_bogus": 1}}', "[1]", '{"a": 3}', "{}", '{"as-shipped": {}}'):
        with pytest.raises(ValueError):
            schema.parse_ring_variants(bad)


def test_csv_round_trip_and_header_check(tmp_path: Path):
    path = tmp_path / "r.csv"
    row = {
        **schema.point("ring", 2, 48, "followup", batch=1, dtype="float32", layout="zigzag", variant="v", cached_len=7),
        "latency_ms": 1.5,
        "status": "mismatch",
        "error": 'quote " and, comma',
    }
    schema.append_rows(path, [row])
    path.write_bytes(path.read_bytes() + b"ring,v,2,4")  # a torn last line
    schema.append_rows(path, [{**row, "seq_len": 61, "status": "ok"}])
    rows = schema.read_rows(path)
    assert [r["status"] for r in rows] == ["mismatch", "ok"] and rows[0]["error"] == row["error"]
    assert schema.row_key(rows[0]) == schema.Point("ring", "v", 2, 48, 7, "followup")
    assert float(rows[0]["latency_ms"]) == 1.5 and rows[0]["layout"] == "zigzag"
    assert schema.done_points(path) == {schema.Point("ring", "v", 2, 48, 7, "followup"),
                                        schema.Point("ring", "v", 2, 61, 7, "followup")}  # fmt: skip
    old = tmp_path / "old.csv"
    old.write_text(",".join(c for c in schema.COLUMNS if c != "variant") + "\n")
    with pytest.raises(ValueError, match="older schema"):
        schema.append_rows(old, [row])


def _append_many(path: str, writer: int) -> None:
    for i in range(40):
        schema.append_rows(path, [{"strategy": "ring", "variant": f"w{writer}", "world_size": 2, "seq_len": i,
                                   "phase": "prefill", "status": "ok", "error": "x" * 3000}])  # fmt: skip


def test_concurrent_appends_never_interleave(tmp_path: Path):
    """Bench ranks and the sweep append to one file; the lock keeps every row whole."""
    import multiprocessing

    path = str(tmp_path / "r.csv")
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(path, w)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    rows = schema.read_rows(path)
    assert len(rows) == 160 and all(len(r["error"]) == 3000 for r in rows)
    assert {(r["variant"], int(r["seq_len"])) for r in rows} == {(f"w{w}", i) for w in range(4) for i in range(40)}
    assert open(path).read().count("strategy,variant") == 1  # one header


# ---------------------------------------------------------------------------- exactness


@pytest.mark.parametrize(
    "dtype, errors, verdict",
    [
        ("float32", {"max_abs_err": 3e-5, "rel_err": 1.99, "ref_norm": 1.5e-5}, "rel_err 1.99 > 0.0001"),
        ("float32", {"max_abs_err": 5e-7, "rel_err": 2e-7, "ref_norm": 15.0}, ""),
        ("bfloat16", {"max_abs_err": 0.1, "rel_err": 4.7e-3, "ref_norm": 900.0}, ""),
        ("bfloat16", {"max_abs_err": 0.5, "rel_err": 0.03, "ref_norm": 900.0}, "rel_err 0.03 > 0.02"),
        # a flipped greedy token: a near-tie passes, a clear gap does not
        ("bfloat16", {"max_abs_err": 0.1, "rel_err": 4e-3, "ref_norm": 900.0, "top2_gap": 0.15}, ""),
        ("bfloat16", {"max_abs_err": 0.1, "rel_err": 4e-3, "ref_norm": 900.0, "top2_gap": 0.5}, "top-2 gap 0.5"),
        ("float32", {"max_abs_err": 0.0, "rel_err": math.nan, "ref_norm": 0.0}, "degenerate"),
        ("float32", {"max_abs_err": math.nan, "rel_err": math.nan, "ref_norm": 3.0}, "non-finite"),
    ],
)
def test_judge(dtype: str, errors: dict, verdict: str):
    got = schema.judge(dtype, errors)
    assert (verdict in got) if verdict else got == "", got


def test_compare_stops_at_the_first_differing_decode_step():
    ref = torch.randn(4, 2, 50)  # [1 + steps, batch, vocab]
    out = ref.clone()
    out[2:] += torch.randn(2, 2, 50)  # steps 2 and 3 diverged
    ref_tokens, tokens = ref.argmax(-1).T, out.argmax(-1).T
    tokens[:, 2] = (ref_tokens[:, 2] + 1) % 50  # the first different token is at step 2
    got = compare((out, tokens), (ref, ref_tokens))
    diff = out[:3].double() - ref[:3].double()
    assert got["max_abs_err"] == pytest.approx(diff.abs().max().item())
    assert got["rel_err"] == pytest.approx((diff.norm() / ref[:3].double().norm()).item())
    assert got["same_next_token"] is False
    top2 = ref[2].topk(2, -1).values
    assert got["top2_gap"] == pytest.approx((top2[:, 0] - top2[:, 1]).max().item())
    same = compare((ref[0], ref_tokens[:, 0]), (ref[0], ref_tokens[:, 0]))
    assert same["max_abs_err"] == 0 and same["same_next_token"] is True and "top2_gap" not in same


# ---------------------------------------------------------------------------- FLOPs and floors


def test_flops_formula():
    shape = FlopShape(linear_params=1000, head_params=100, attn_width=8)
    # prefill of 4 tokens: 2*4*1000 linear + 2*100 head + 2*8*(4*5/2) attention
    assert model_flops(shape, batch=1, new_tokens=4) == 8000 + 200 + 160
    # one decode token after 10 cached: sees 11 keys
    assert model_flops(shape, batch=2, new_tokens=1, context=10) == 2 * 2 * (1000 + 100 + 8 * 11)


def test_flop_shape_of_the_micro_llama():
    """By hand: 2 layers of emb 192, 4 heads of 48, MLP 512 wide, vocab 256, fp32."""
    meta = fms.models.get_model("llama", "micro", device_type="meta", distributed_strategy="none", nlayers=2)
    s = flop_shape(meta, element_size=4)
    per_layer = 192 * 3 * 192 + 192 * 192 + 192 * 2 * 512 + 512 * 192  # qkv, dense, gate+up, down
    assert s.linear_params == 2 * per_layer and s.head_params == 256 * 192
    assert s.attn_width == 2 * 4 * (48 + 48)
    assert s.kv_bytes_per_token == 2 * 4 * (48 + 48) * 4
    norms = 2 * 2 * 192 + 192
    assert s.weight_bytes == (2 * per_layer + 256 * 192 + norms) * 4  # every weight but the embedding
    assert s.head_bytes == 256 * 192 * 4 and s.kv_heads == 4


def test_floor_formulas_with_given_rates():
    shape = FlopShape(linear_params=10**9, head_params=10**8, attn_width=4096, weight_bytes=2 * 10**9,
                      kv_bytes_per_token=10**5, head_bytes=2 * 10**8, kv_heads=8)  # fmt: skip
    rates = Rates(matmul_tflops=500.0, attention_tflops=400.0, memory_gbps=4000.0)
    L = 8192
    linear = 2.0 * (1e9 * L + 1e8)
    attention = 2.0 * 4096 * L * (L + 1) / 2
    one = (linear / 500e12 + attention / 400e12) * 1e3
    assert floor_ms(shape, rates, 1, 1, "prefill", 1, L) == pytest.approx(one)
    for cp, tp in ((4, 1), (1, 4), (2, 2)):
        assert floor_ms(shape, rates, cp, tp, "prefill", 1, L) == pytest.approx(one / 4)
    # a follow-up of 512 on 8192 cached: ring shards the new tokens as tp shards the weights, both divide
    lin, att = 2.0 * (1e9 * 512 + 1e8), 2.0 * 4096 * (512 * L + 512 * 513 / 2)
    for cp, tp in ((2, 1), (1, 2)):
        assert floor_ms(shape, rates, cp, tp, "followup", 1, 512, L) == pytest.approx(
            (lin / 2 / 500e12 + att / 2 / 400e12) * 1e3
        )
    # a short follow-up is bounded by reading the weights the GPU holds: all of them for ring,
    # for tp 1/W of the layers and the whole (replicated) LM head
    assert floor_ms(shape, rates, 2, 1, "followup", 1, 1, 16) == pytest.approx(2e9 / 4000e9 * 1e3)
    assert floor_ms(shape, rates, 1, 2, "followup", 1, 1, 16) == pytest.approx((0.9e9 + 0.2e9) / 4000e9 * 1e3)
    # decode at 8192 + 16 (the middle of 32 steps): bytes read per GPU over 4 TB/s
    cache = (L + 16) * 1e5
    gbps = 4000e9
    assert floor_ms(shape, rates, 1, 1, "decode", 1, L, 0, 32) == pytest.approx((2e9 + cache) / gbps * 1e3)
    assert floor_ms(shape, rates, 4, 1, "decode", 1, L, 0, 32) == pytest.approx((2e9 + cache / 4) / gbps * 1e3)
    tp4 = (1.8e9 / 4 + 0.2e9 + cache / 4) / gbps * 1e3
    assert floor_ms(shape, rates, 1, 4, "decode", 1, L, 0, 32) == pytest.approx(tp4)
    assert floor_ms(shape, rates, 2, 2, "decode", 1, L, 0, 32) == pytest.approx(
        (1.8e9 / 2 + 0.2e9 + cache / 4) / gbps * 1e3
    )
    # 8 kv-heads over tp 16: every rank still holds a whole kv-head, 1/8 of the cache, not 1/16
    assert floor_ms(shape, rates, 1, 16, "decode", 1, L, 0, 32) == pytest.approx(
        (1.8e9 / 16 + 0.2e9 + cache / 8) / gbps * 1e3
    )
    assert math.isnan(floor_ms(shape, None, 2, 1, "prefill", 1, L))


def test_ceilings_file_is_reused(tmp_path: Path):
    path = ceilings.ceilings_path(tmp_path / "results.csv")
    assert path.name == "results.ceilings.json"
    assert ceilings.load_or_measure(path, torch.device("cpu"), "float32", 4, 48, log=lambda _m: None) is None
    key = ceilings.rates_key("cpu", "float32", 4, 48)
    path.write_text(f'{{"{key}": {{"matmul_tflops": 1, "attention_tflops": 2, "memory_gbps": 3}}}}')
    got = ceilings.load_or_measure(path, torch.device("cpu"), "float32", 4, 48, log=lambda _m: None)
    assert got == Rates(1, 2, 3)


@pytest.mark.cuda
@needs_gpu
def test_rates_measured_on_a_gpu(tmp_path: Path):
    path = tmp_path / "r.ceilings.json"
    rates = ceilings.load_or_measure(path, torch.device("cuda"), "bfloat16", 32, 128)
    assert rates.matmul_tflops > 10 and rates.attention_tflops > 10 and rates.memory_gbps > 100
    assert ceilings.load_or_measure(path, torch.device("cuda"), "bfloat16", 32, 128) == rates  # read back


# ---------------------------------------------------------------------------- follow-up calls


@torch.no_grad()
def test_fms_followup_matches_a_prefill_of_the_whole_prompt():
    """FMS's cached multi-token path is causal aligned top-left; with the explicit mask and
    positions a follow-up gives the logits of one prefill of P+T, and leaves the cache reusable."""
    model = micro().eval()
    cached_len, new = random.randint(5, 40), random.randint(2, 9)
    ids = torch.randint(0, 256, (2, cached_len + new))
    whole = model(ids, last_n_tokens=1)[:, -1]
    cache = peers.cached_prefill(model, ids[:, :cached_len])
    follow = peers.followup_fn("single", model)
    got = follow(ids[:, cached_len:], cache, cached_len)
    torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(follow(ids[:, cached_len:], cache, cached_len), whole, rtol=1e-5, atol=1e-5)
    naive, _ = model(ids[:, cached_len:], past_key_value_states=cache, use_cache=True, last_n_tokens=1)
    assert (naive[:, -1] - whole).abs().max() > 1e-3  # what the mask is for
    mask = peers.followup_mask(1, 2, 3, torch.device("cpu"))[0]
    assert mask.tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


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
    _, spans, logits, tokens = timing.greedy_decode(model, padded, steps, clock, kwargs)
    assert len(spans) == steps and logits.shape[:2] == (1 + steps, b)
    for i in range(b):
        _, _, alone, alone_tokens = timing.greedy_decode(model, ids[i : i + 1, n - kept[i] :], steps, clock)
        torch.testing.assert_close(logits[:, i], alone[:, 0], rtol=1e-4, atol=1e-4)
        assert torch.equal(tokens[i], alone_tokens[0])
    unmasked = timing.greedy_decode(model, padded, steps, clock)[2]
    assert (unmasked[0, -1] - logits[0, -1]).abs().max() > 1e-3  # what the mask is for


def test_torch_cp_runs_any_length_padded_to_whole_chunks():
    """torch_cp is timed at the next multiple of 2 x world x 128 tokens (its load-balancing chunks
    failed otherwise); lengths already there are untouched."""
    from fmsring.harness.peers import CP_CHUNK_ALIGN, torch_cp_length

    assert CP_CHUNK_ALIGN == 128
    assert torch_cp_length(7000, 4) == 7168 and torch_cp_length(6998, 2) == 7168
    assert torch_cp_length(8192, 4) == 8192 and torch_cp_length(131072, 2) == 131072
    for _ in range(20):
        n, w = random.randrange(1, 10**6), random.choice([1, 2, 3, 4, 8])
        padded = torch_cp_length(n, w)
        assert padded % (2 * w * 128) == 0 and n <= padded < n + 2 * w * 128


TOPO = """\
\tGPU0\tGPU1\tGPU2\tCPU Affinity
GPU0\t X \t{link}\tSYS\t0-31
GPU1\t{link}\t X \tSYS\t0-31
"""


def test_interconnect_is_named_per_run(monkeypatch: pytest.MonkeyPatch):
    """NVLink or PCIe from nvidia-smi's matrix; "pcie-like" whenever NCCL_P2P_DISABLE sends NCCL
    through host memory; nothing for CPUs or one GPU."""
    assert ceilings.topo_link(TOPO.format(link="NV18")) == "nvlink"
    assert ceilings.topo_link(TOPO.format(link="PXB")) == "pcie"
    assert ceilings.topo_link("no matrix here") == ""
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    assert ceilings.interconnect("cuda", 4) == "pcie-like"
    assert ceilings.interconnect("cuda", 1) == "" and ceilings.interconnect("cpu", 0) == ""
    assert math.isnan(ceilings.measure_ring_shift_gbps())  # no NCCL group here


def test_rows_record_the_environment_that_changes_a_measurement(monkeypatch):
    for name in schema.PERFORMANCE_ENV:
        monkeypatch.delenv(name, raising=False)
    assert schema.launch_env() == ""
    monkeypatch.setenv("NCCL_P2P_DISABLE", "1")
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    monkeypatch.setenv("HOME", "/elsewhere")  # not one that changes a measurement
    assert schema.launch_env() == "NCCL_P2P_DISABLE=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True"


def test_a_point_ending_as_its_stall_timer_fires_gets_one_outcome():
    """The stall timer and the end of the guarded block race for one lock: a timer firing after
    the block ended does nothing, and a block ending while the stall is being recorded waits
    (in the bench the stall then exits the process), so no point gets two rows."""
    import threading
    import time

    from fmsring.harness.watchdog import StallGuard

    calls = []
    guard = StallGuard(60.0, calls.append)
    with guard:
        pass
    guard._fire(calls.append, 60.0)  # the timer thread, had it started just as the block ended
    assert calls == []

    stalling, release, ended = threading.Event(), threading.Event(), threading.Event()

    def on_stall(budget_s: float) -> None:
        calls.append(budget_s)
        stalling.set()
        release.wait(5)

    def point() -> None:
        with StallGuard(0.01, on_stall):
            stalling.wait(5)  # the point ends just as its stall is being recorded
        ended.set()

    worker = threading.Thread(target=point)
    worker.start()
    assert stalling.wait(5)
    time.sleep(0.1)
    assert not ended.is_set()  # the block's end waits for the stall's outcome
    release.set()
    worker.join(5)
    assert ended.is_set() and calls == [0.01]
