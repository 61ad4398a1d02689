"""The inference CLI as users run it: under torchrun its completions and
conversations are the single-process ones, and its chats HF transformers';
bad flag combinations and refusals fail early with one line, from rank 0,
that says what to do."""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys

import pytest
import torch.distributed as dist
from transformers import AutoTokenizer

from fmsring.demo import hf_chat
from fmsring.inference import main, parse_args, split_turns
from tests.conftest import ROOT
from tests.tiny_checkpoint import IM_END, IM_START, hf_conversation, hf_model, write_checkpoint

ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
MICRO = ["--variant", "micro", "--max_new_tokens", "9", "--default_dtype", "fp32", "--seed", "3"]
BATCH = ["--prompt", "hello ring", "--prompt", "a longer prompt, padded left"]


def run(cmd: list[str], stdin: str | None = None) -> list[str]:
    """The CLI's completion and timing lines."""
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, input=stdin, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return [line for line in res.stdout.splitlines() if " -> " in line or "first token" in line]


@pytest.fixture
def in_process():
    """For tests that call ``main`` here: the one-process group it makes goes with the test."""
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def completions(lines: list[str]) -> list[str]:
    assert len(lines) % 2 == 0 and all("time to first token" in t for t in lines[1::2]), lines
    return lines[::2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture(scope="module")
def chat_checkpoint(tmp_path_factory) -> str:
    """Like SmolLM2-Instruct's: ChatML markup, a tokenizer that adds no BOS."""
    return write_checkpoint(tmp_path_factory.mktemp("chat"), chat=True)


@pytest.mark.parametrize(
    "extra",
    # fast: with the cache; both layouts without it, test_model's greedy generation
    [[], pytest.param(["--no_use_cache", "--ring_layout", "contiguous"], marks=pytest.mark.slow)],
)
def test_ring_cli_matches_single_process(extra):
    single = run([sys.executable, "-m", "fmsring.inference", "--distributed_strategy", "replicated", *MICRO, *BATCH])
    ring = run([*TORCHRUN, "--nproc_per_node=2", "-m", "fmsring.inference", *MICRO, *BATCH, *extra])
    assert len(ring) == 3 and "time to first token" in ring[-1]
    assert ring[:2] == single[:2]


def fresh_turns() -> list[str]:
    """Turn texts in the tokenizer's alphabet: one character, a few, a long one, a multi-line block (last)."""
    alphabet = "abcdefghij klmnopqrstuvwxyz.,!?ABC"

    def text(n: int) -> str:
        return "".join(random.choice(alphabet) for _ in range(n)).strip() or "x"

    return [text(random.randrange(5, 15)), text(1), text(2), text(random.randrange(20, 30)), f"{text(4)}\n{text(3)}"]


def test_split_turns_keeps_each_block_as_written():
    assert split_turns("a\n\n b\nc \n \t\n\n\nd") == ["a\n", " b\nc \n", "d"]
    assert split_turns("\n\nx\n\n") == ["x\n"]


def test_turns_under_torchrun_match_one_process_and_interactive(checkpoint, tmp_path):
    turns = [t + "\n" for t in fresh_turns()]  # a block's text is the file's, its final newline included
    turns_file = tmp_path / "turns.txt"
    turns_file.write_text("\n".join(turns))
    assert split_turns(turns_file.read_text()) == turns
    args = ["-m", "fmsring.inference", "--architecture", "hf_pretrained", "--model_path", checkpoint]
    args += ["--tokenizer", checkpoint, "--max_new_tokens", "6"]
    single = run([sys.executable, *args, "--distributed_strategy", "ring", "--turns", str(turns_file)])
    ring = run([*TORCHRUN, "--nproc_per_node=2", *args, "--turns", str(turns_file)])
    assert [c.split(" -> ")[0] for c in completions(single)] == [repr(t) for t in turns]
    assert completions(ring) == completions(single)
    # typed: one turn a line, its newline kept (the multi-line block becomes one line), blank lines skipped
    lines = [*turns[:2], "\n", *turns[2:-1], turns[-1].replace("\n", " ").rstrip() + "\n"]
    typed = completions(run([*TORCHRUN, "--nproc_per_node=2", *args, "--interactive"], stdin="".join(lines)))
    assert typed[:-1] == completions(single)[:-1]
    assert typed[-1].startswith(repr(lines[-1]) + " -> ")


def test_chat_is_hf_on_the_template_and_plain_turns_get_only_the_tokenizers_special_tokens(
    chat_checkpoint, tmp_path, in_process
):
    """--chat under torchrun (turns from a file) and in one process (turns from --prompt) replies as
    HF does on the chat template's rendering. Without --chat, text already in the template's markup
    is fed as it is: this tokenizer adds no BOS, so none is put before it."""
    tok, hf = AutoTokenizer.from_pretrained(chat_checkpoint), hf_model(chat_checkpoint)
    messages = [t.replace("\n", " ") for t in fresh_turns()[:3]]
    messages[1] += "\nand a second line"
    n_new = random.randrange(3, 9)
    texts = [tok.decode(r[:-1] if r[-1] == tok.eos_token_id else r) for r, _ in hf_chat(hf, tok, messages, n_new)]
    want = [f"{m!r} -> {t!r}" for m, t in zip(messages, texts)]
    turns_file = tmp_path / "turns.txt"
    turns_file.write_text("\n\n".join(messages) + "\n")
    args = ["-m", "fmsring.inference", "--architecture", "hf_pretrained", "--model_path", chat_checkpoint]
    args += ["--tokenizer", chat_checkpoint, "--max_new_tokens", str(n_new), "--chat"]
    assert completions(run([*TORCHRUN, "--nproc_per_node=2", *args, "--turns", str(turns_file)])) == want
    prompts = [flag for m in messages for flag in ("--prompt", m)]
    assert [r.text for r in main(args[2:] + prompts)] == texts

    plain = [f"{IM_START}user\n{messages[0]}{IM_END}\n{IM_START}assistant\n", f"{IM_END}\n"]
    turns_file.write_text("\n".join(plain))
    replies = main([*args[2:-1], "--turns", str(turns_file)])
    ids = [tok(t, add_special_tokens=i == 0).input_ids for i, t in enumerate(plain)]
    assert ids[0][:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("u")]  # the text's own BOS, once
    assert [r.tokens.tolist() for r in replies] == hf_conversation(hf, ids, [n_new] * 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--architecture", "hf_pretrained"], "exactly one of them"),
        (["--architecture", "hf_pretrained", "--model_path", "x", "--variant", "y"], "exactly one of them"),
        (["--architecture", "hf_pretrained", "--model_path", "x", "--model_source", "hf"], "drop --model_source"),
        (["--architecture", "llama"], "needs --variant"),
        (["--variant", "micro", "--interactive", "--distributed_strategy", "tp"], "--distributed_strategy ring"),
        (["--variant", "micro", "--interactive", "--no_use_cache"], "drop --no_use_cache"),
        (["--variant", "micro", "--turns", "/no/such/file"], "no such file"),
        (["--variant", "micro", "--prompt", "a", "--interactive"], "not allowed with argument"),
        (["--variant", "micro", "--max_new_tokens", "0"], "at least 1"),
        (["--architecture", "hf_pretrained", "--model_path", "/no/such"], "--model_path: no such directory: /no/such"),
        (["--variant", "micro", "--tokenizer", "/no/such"], "--tokenizer: no such directory: /no/such"),
        (["--variant", "micro", "--chat", "--prompt_file", "p.txt"], "not --prompt_file"),
        (["--variant", "micro", "--chat", "--distributed_strategy", "replicated"], "--distributed_strategy ring"),
    ],
)
def test_bad_flag_combinations_fail_before_loading_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    err = capsys.readouterr().err
    assert message in err and err.startswith("fmsring.inference: error: ") and len(err.splitlines()) == 1, err


SLOW_RANK0 = """
import os
if os.environ.get("RANK") == "0":
    import time
    import fmsring
    load = fmsring.get_model
    fmsring.get_model = lambda *args, **kwargs: time.sleep(3) or load(*args, **kwargs)
"""


@pytest.mark.slow  # fast: the refusal's text, test_mesh's factorisations; this adds rank 0 loading last under torchrun
def test_a_ring_tp_the_heads_refuse_is_one_line_from_rank_0(tmp_path):
    """Four ranks as the README launches them, ring_tp=4 on 6 heads: rank 0 says which heads the model
    has and which ring_tp values fit; no rank prints a traceback. What follows is torchrun's own report.
    Rank 0 loads last here (3 s behind, through a sitecustomize), as on a loaded machine: the other
    ranks meet the error first, and their exit must not stop rank 0 before it has said it."""
    path = write_checkpoint(tmp_path, heads=6, kvheads=2)
    (tmp_path / "sitecustomize.py").write_text(SLOW_RANK0)
    env = {**ENV, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ENV['PYTHONPATH']}"}
    cmd = [*TORCHRUN, "--nproc_per_node=4", "-m", "fmsring.inference", "--architecture", "hf_pretrained"]
    cmd += ["--model_path", path, "--tokenizer", path, "--ring_tp", "4", "--prompt", "hi"]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and not res.stdout
    refusal = (
        f"fmsring.inference: error: ring_tp=4: {path} has 6 attention heads and 2 kv-heads, which FMS's tensor "
        "parallelism cannot split over 4 ranks (The number of heads must be divisible by world size); ring_tp "
        "values that divide both the world (4) and the heads: 1, 2"
    )
    lines = res.stderr.splitlines()
    torchrun_report = next(i for i, line in enumerate(lines) if re.match(r"[IWE]\d{4} ", line))
    assert lines[:torchrun_report] == [refusal], res.stderr
    assert res.stderr.count("error:") == 1 and res.stderr.count("Traceback") <= 1, res.stderr  # torchrun's own


def test_empty_turns_file_mismatched_tokenizer_and_chat_without_template_say_what_to_do(
    checkpoint, tmp_path, capsys, in_process
):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(SystemExit):
        parse_args(["--variant", "micro", "--turns", str(blank)])
    assert "holds no text" in capsys.readouterr().err
    hf = ["--architecture", "hf_pretrained", "--model_path", checkpoint, "--distributed_strategy", "replicated"]
    with pytest.raises(SystemExit):
        main(hf)  # the default char_tokenizer
    assert re.search("has 256 token ids but the model's vocabulary has 98.*--tokenizer", capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main([*hf[:-2], "--tokenizer", checkpoint, "--chat"])
    assert "chat template, and " in capsys.readouterr().err


def test_cache_is_sized_for_the_whole_generation(monkeypatch: pytest.MonkeyPatch):
    """Each rank of the ring gets its share of the new tokens plus two slots up front, so a long
    generation never regrows (copies) the cache; short ones keep the default headroom."""
    from fmsring.inference import ring_options

    monkeypatch.setenv("WORLD_SIZE", "4")
    args = parse_args(["--variant", "micro", "--max_new_tokens", "1000", "--ring_tp", "2"])
    assert ring_options(args) == {"ring_layout": "zigzag", "ring_tp": 2, "ring_cache_headroom": 502}
    assert ring_options(parse_args(["--variant", "micro", "--max_new_tokens", "32"]))["ring_cache_headroom"] == 256
