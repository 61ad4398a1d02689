"""The inference CLI as users run it: under torchrun its completions and
conversations are the single-process ones; bad flag combinations fail early
with a message that says what to do."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from fmsring.inference import main, parse_args, split_turns
from tests.tiny_checkpoint import write_checkpoint

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
MICRO = ["--variant", "micro", "--max_new_tokens", "9", "--default_dtype", "fp32", "--seed", "3"]
BATCH = ["--prompt", "hello ring", "--prompt", "a longer prompt, padded left"]


def run(cmd: list[str], stdin: str | None = None) -> list[str]:
    """The CLI's completion and timing lines."""
    res = subprocess.run(cmd, cwd=ROOT, env=ENV, input=stdin, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    return [line for line in res.stdout.splitlines() if " -> " in line or "first token" in line]


def completions(lines: list[str]) -> list[str]:
    assert len(lines) % 2 == 0 and all("time to first token" in t for t in lines[1::2]), lines
    return lines[::2]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"))


def test_ring_cli_matches_single_process():
    single = run([sys.executable, "-m", "fmsring.inference", "--distributed_strategy", "replicated", *MICRO, *BATCH])
    for extra in ([], ["--no_use_cache", "--ring_layout", "contiguous"]):
        ring = run([*TORCHRUN, "--nproc_per_node=2", "-m", "fmsring.inference", *MICRO, *BATCH, *extra])
        assert len(ring) == 3 and "time to first token" in ring[-1]
        assert ring[:2] == single[:2]


def fresh_turns() -> list[str]:
    """Turn texts in the tokenizer's alphabet: one character, a few, a long one, a multi-line block (last)."""
    alphabet = "abcdefghij klmnopqrstuvwxyz.,!?ABC"

    def text(n: int) -> str:
        return "".join(random.choice(alphabet) for _ in range(n)).strip() or "x"

    return [text(random.randrange(5, 15)), text(1), text(2), text(random.randrange(20, 30)), f"{text(4)}\n{text(3)}"]


def test_turns_under_torchrun_match_one_process_and_interactive(checkpoint, tmp_path):
    turns = fresh_turns()
    turns_file = tmp_path / "turns.txt"
    turns_file.write_text("\n\n".join(turns) + "\n")
    assert split_turns(turns_file.read_text()) == turns
    args = ["-m", "fmsring.inference", "--architecture", "hf_pretrained", "--model_path", checkpoint]
    args += ["--tokenizer", checkpoint, "--max_new_tokens", "6"]
    single = run([sys.executable, *args, "--distributed_strategy", "ring", "--turns", str(turns_file)])
    ring = run([*TORCHRUN, "--nproc_per_node=2", *args, "--turns", str(turns_file)])
    assert [c.split(" -> ")[0] for c in completions(single)] == [repr(t) for t in turns]
    assert completions(ring) == completions(single)
    # typed: one turn a line (the multi-line block becomes one line), blank lines skipped
    lines = [*turns[:2], "", *turns[2:-1], turns[-1].replace("\n", " "), ""]
    typed = completions(run([*TORCHRUN, "--nproc_per_node=2", *args, "--interactive"], stdin="\n".join(lines)))
    assert typed[:-1] == completions(single)[:-1]
    assert typed[-1].startswith(repr(lines[-2]) + " -> ")


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
    ],
)
def test_bad_flag_combinations_fail_before_loading(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_empty_turns_file_and_mismatched_tokenizer_say_what_to_do(checkpoint, tmp_path, capsys):
    blank = tmp_path / "blank.txt"
    blank.write_text("\n  \n\n")
    with pytest.raises(SystemExit):
        parse_args(["--variant", "micro", "--turns", str(blank)])
    assert "holds no text" in capsys.readouterr().err
    hf = ["--architecture", "hf_pretrained", "--model_path", checkpoint, "--distributed_strategy", "replicated"]
    with pytest.raises(SystemExit, match="has 256 token ids but the model's vocabulary has 98.*--tokenizer"):
        main(hf)  # the default char_tokenizer


def test_cache_is_sized_for_the_whole_generation(monkeypatch: pytest.MonkeyPatch):
    """Each rank of the ring gets its share of the new tokens plus two slots up front, so a long
    generation never regrows (copies) the cache; short ones keep the default headroom."""
    from fmsring.inference import ring_options

    monkeypatch.setenv("WORLD_SIZE", "4")
    args = parse_args(["--variant", "micro", "--max_new_tokens", "1000", "--ring_tp", "2"])
    assert ring_options(args) == {"ring_layout": "zigzag", "ring_tp": 2, "ring_cache_headroom": 502}
    assert ring_options(parse_args(["--variant", "micro", "--max_new_tokens", "32"]))["ring_cache_headroom"] == 256
