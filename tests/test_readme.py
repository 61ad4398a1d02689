"""Every command in the README runs as written, and does what the README says.

Its fenced blocks are read from README.md on every run. Each ``python`` block starts with
``# <file>.py`` and is saved under that name; each ``bash`` block runs through bash in that folder,
on CPU ranks (gloo), with only ``CKPT`` set: a tiny checkpoint written here, with a tokenizer like
the demo model's (ChatML's chat template, no BOS added) and its heads split as the demo model's are.
Their outputs are held against HF transformers' greedy ``generate`` on the same checkpoint (for a
conversation: on the template's rendering of the whole conversation so far, turn by turn); the
bench's rows are read back. The set-up block runs from a fresh shell in the repository.
``make`` lines cannot run inside the tests (``make test`` is this suite, ``make venv`` would install
into the shared environment, a GPU sweep needs GPUs, the CPU sweep takes minutes and
``tests/test_sweep.py`` runs one end to end, ``tests/test_demo.py`` runs the demo): each target and
setting must be one ``make help`` lists, make must accept the line as written (``make -n``), and
``make test`` must be what CI runs (``.ci/run``).
"""

from __future__ import annotations

import ast
import csv
import os
import random
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from fmsring.demo import hf_chat
from fmsring.inference import parse_args, split_turns
from tests.conftest import ROOT
from tests.tiny_checkpoint import CHARS, hf_greedy, hf_model, write_checkpoint

# Which bash block each test runs, by a string it holds; a block holding several belongs to the
# one listed last (the ring x TP command is a CLI command too). Blocks of make lines apart.
COMMANDS = {
    "setup": "source .venv/bin/activate",
    "example": "example.py",
    "cli": "--prompt",
    "chat": "chat.py",
    "turns": "--turns",
    "mesh": "--ring_tp",
    "bench": "-m fmsring.bench",
}


def readme() -> str:
    return (ROOT / "README.md").read_text()


def blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", readme(), re.MULTILINE | re.DOTALL)


def make_lines(block: str) -> list[str]:
    """The make command lines of a block (comments dropped)."""
    lines = [line.split("#")[0].strip() for line in block.splitlines()]
    return [line for line in lines if line.startswith("make ")]


def runnable(block: str) -> str:
    """The block without its make lines: what a test runs."""
    return "\n".join(line for line in block.splitlines() if not line.strip().startswith("make "))


def scripts() -> dict[str, str]:
    """The python blocks by the file name their first line gives."""
    named = {}
    for block in blocks("python"):
        first = block.splitlines()[0]
        assert re.fullmatch(r"# \w+\.py", first), f"a python block must start with '# <file>.py': {first!r}"
        named[first[2:]] = block
    return named


def owner(block: str) -> str | None:
    """The test a bash block belongs to (see COMMANDS)."""
    return next((name for name, key in reversed(COMMANDS.items()) if key in block), None)


def command(name: str) -> str:
    (block,) = [b for b in blocks("bash") if owner(b) == name]
    return block


def flag(block: str, name: str) -> str:
    """The value a command line of ``block`` gives to ``name``."""
    argv = shlex.split(block.replace("\\\n", " "))
    return argv[argv.index(name) + 1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt"), heads=6, kvheads=3, chat=True)


@pytest.fixture(scope="module")
def references(ckpt):
    return hf_model(ckpt), AutoTokenizer.from_pretrained(ckpt)


def run_block(block: str, ckpt: str, cwd: Path, files: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """A bash block as a user runs it: the scripts saved beside it (``files`` in place of some), torchrun
    on PATH, CPU only."""
    for name, text in {**scripts(), **(files or {})}.items():
        (cwd / name).write_text(text)
    env = {
        **os.environ,
        "CKPT": ckpt,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
        "CUDA_VISIBLE_DEVICES": "",
        "OMP_NUM_THREADS": "1",
    }
    res = subprocess.run(["bash", "-ec", block], cwd=cwd, env=env, capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, f"{block}\nfailed:\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
    return res


def test_every_block_is_run():
    bash = [b for b in blocks("bash") if runnable(b).strip()]
    for name, key in COMMANDS.items():
        assert sum(owner(b) == name for b in bash) == 1, f"one bash block must hold {key!r} ({name})"
    assert all(owner(b) for b in bash), "a bash block that no test runs"
    assert sorted(scripts()) == ["chat.py", "example.py"]
    assert all(any(name in b for b in bash) for name in scripts()), "a python block that no command runs"
    fenced = re.findall(r"^```(\w*)$", readme(), re.MULTILINE)
    assert set(fenced[::2]) == {"bash", "python"}, f"a fenced block no test reads: {fenced[::2]}"


def test_make_commands_resolve():
    """The README's make lines: the three first commands first, each target one make knows, each
    setting one ``make help`` lists, and each line accepted by make as written (``make -n``)."""
    lines = [line for b in blocks("bash") for line in make_lines(b)]
    assert lines[:3] == ["make sweep", "make test", "make demo"], lines
    assert "make test" in (ROOT / ".ci" / "run").read_text().splitlines(), "CI no longer runs `make test`"
    help_text = subprocess.run(["make", "help"], cwd=ROOT, capture_output=True, text=True, timeout=60).stdout
    for line in lines:
        argv = shlex.split(line)[1:]
        targets = [a for a in argv if "=" not in a]
        settings = [a.partition("=")[0] for a in argv if "=" in a]
        assert all(re.search(rf"^  {t}\b", help_text, re.MULTILINE) for t in targets), (
            f"{line}: a target make help lacks"
        )
        assert all(re.search(rf"\b{v}=", help_text) for v in settings), f"{line}: a setting make help lacks"
        res = subprocess.run(["make", "-n", *argv], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, f"{line}\n{res.stdout[-2000:]}\n{res.stderr[-2000:]}"


@pytest.mark.slow
def test_make_sweep_runs(tmp_path):
    """The first set-up command, run for real (minutes on CPUs: the slow tier, ``make test-all``):
    the CPU default sweep ends with every point ok, its rows and figures in one run folder. Only
    where the folder goes is changed (OUT_DIR, a setting like any other), to keep runs/local clean."""
    res = subprocess.run(
        ["make", "sweep", f"OUT_DIR={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1800,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, f"{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    with open(run / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and {r["status"] for r in rows} == {"ok"}, {r["status"] for r in rows}
    assert list((run / "figures").glob("*.png")), "the sweep drew no figure"


@pytest.mark.slow  # fast: test_bench's two-rank launch runs this command with more strategies
def test_bench_command(tmp_path):
    """The bench's CPU command writes an ok row for every strategy and phase it names."""
    block = command("bench")
    run_block(block, "", tmp_path)
    with open(tmp_path / flag(block, "--out")) as f:
        rows = list(csv.DictReader(f))
    want = {(s, p) for s in flag(block, "--strategies").split(",") for p in flag(block, "--phases").split(",")}
    assert {(r["strategy"], r["phase"]) for r in rows if r["status"] == "ok"} == want, rows


def test_setup_from_a_fresh_shell(ckpt, tmp_path):
    """The set-up lines (but ``make venv``), in the repository, from a shell whose PATH lacks the venv:
    afterwards torchrun is the venv's and CKPT the demo checkpoint's directory."""
    block = runnable(command("setup")) + '\necho "$(command -v torchrun)"; echo "$CKPT"'
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "CKPT")}
    venv_bin = (ROOT / ".venv" / "bin").resolve()
    env["PATH"] = os.pathsep.join(p for p in env["PATH"].split(os.pathsep) if Path(p).resolve() != venv_bin)
    res = subprocess.run(["bash", "-ec", block], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    torchrun, path = res.stdout.splitlines()[-2:]
    assert Path(torchrun).resolve() == venv_bin / "torchrun"
    assert (Path(path) / "config.json").is_file() and (Path(path) / "chat_template.jinja").is_file()


def test_python_example(ckpt, references, tmp_path):
    """Under torchrun and as one process (``python example.py``), HF's greedy tokens."""
    hf, tok = references
    script = scripts()["example.py"]
    prompt = re.search(r'tokenizer\("([^"]*)"', script).group(1)
    n_new = int(re.search(r"max_new_tokens=(\d+)", script).group(1))
    assert "torchrun --standalone --nproc_per_node=2 example.py\npython example.py" in command("example")
    out = run_block(command("example"), ckpt, tmp_path).stdout
    assert out == 2 * (tok.decode(hf_greedy(hf, tok(prompt).input_ids, n_new)) + "\n")


@pytest.mark.slow  # fmsring.generate's own cover of a long prompt is in make test: test_errors
def test_python_example_keeps_a_prompt_longer_than_fms_default_window(ckpt, references, tmp_path):
    """FMS's generate feeds only a prompt's last 4096 tokens unless told; the README's example feeds
    all of a longer one (RoPE grown past the checkpoint's 64 positions): HF's tokens on the whole prompt."""
    hf, tok = references
    script = scripts()["example.py"]
    text = "".join(random.choice(CHARS) for _ in range(random.randrange(4100, 4400)))
    long = script.replace('tokenizer("Once upon a time"', 'tokenizer(open("prompt.txt").read()')
    assert long != script
    (tmp_path / "prompt.txt").write_text(text)
    ids = tok(text).input_ids
    assert len(ids) > 4096
    n_new = int(re.search(r"max_new_tokens=(\d+)", script).group(1))
    torchrun = command("example").splitlines()[0]
    out = run_block(torchrun, ckpt, tmp_path, files={"example.py": long}).stdout
    assert out == tok.decode(hf_greedy(hf, ids, n_new)) + "\n"


@pytest.mark.slow  # fast: test_mesh_cli runs this command with --ring_tp; test_inference's ring CLI
def test_cli(ckpt, references, tmp_path):
    hf, tok = references
    prompt, n_new = flag(command("cli"), "--prompt"), int(flag(command("cli"), "--max_new_tokens"))
    lines = run_block(command("cli"), ckpt, tmp_path).stdout.splitlines()
    want = tok.decode(hf_greedy(hf, tok(prompt).input_ids, n_new))
    assert lines[0] == f"{prompt!r} -> {want!r}"
    assert re.fullmatch(r"time to first token: [\d.]+ ms; per-token latency \(median\): [\d.]+ ms", lines[1])
    assert len(lines) == 2


def test_mesh_command_is_a_mesh_of_its_ranks(ckpt):
    """The ring x tensor parallel command's flags as fmsring.inference parses them: its ranks in
    groups of ring_tp, more than one group, each of more than one rank."""
    block = command("mesh")
    argv = shlex.split(block.replace("\\\n", " ").replace("$CKPT", ckpt))
    nproc = int(re.search(r"--nproc_per_node=(\d+)", block).group(1))
    args = parse_args(argv[argv.index("fmsring.inference") + 1 :])
    assert nproc % args.ring_tp == 0 and nproc > args.ring_tp > 1


@pytest.mark.slow  # fast: the mesh above, test_mesh's factorisations against HF, test_inference's ring_tp launch
def test_mesh_cli(ckpt, references, tmp_path):
    """The ring x tensor parallel command as written (six CPU ranks): HF's greedy tokens."""
    hf, tok = references
    block = command("mesh")
    prompt, n_new = flag(block, "--prompt"), int(flag(block, "--max_new_tokens"))
    lines = run_block(block, ckpt, tmp_path).stdout.splitlines()
    assert lines[0] == f"{prompt!r} -> {tok.decode(hf_greedy(hf, tok(prompt).input_ids, n_new))!r}"


def hf_replies(hf, tok, messages: list[str], n_new: int) -> list[str]:
    """HF's greedy replies on the chat template's rendering, as Chat's ``text``: no end-of-turn token."""
    eos = tok.eos_token_id
    return [tok.decode(r[:-1] if r[-1] == eos else r) for r, _ in hf_chat(hf, tok, messages, n_new)]


@pytest.mark.slow  # fast: test_chat's replies, fmsring.chat.Chat at 1 and 2 ranks against HF on the template
def test_multi_turn_python(ckpt, references, tmp_path):
    hf, tok = references
    script = scripts()["chat.py"]
    (loop,) = [node for node in ast.walk(ast.parse(script)) if isinstance(node, ast.For)]
    messages = ast.literal_eval(loop.iter)  # for text in [...]
    n_new = int(re.search(r"max_new_tokens=(\d+)", script).group(1))
    lines = run_block(command("chat"), ckpt, tmp_path).stdout.splitlines()
    got = [re.fullmatch(r"(.*) [\d.]+ ms to first token", line) for line in lines]
    assert all(got), lines
    assert [ast.literal_eval(m.group(1)) for m in got] == hf_replies(hf, tok, messages, n_new)


@pytest.mark.slow  # fast: test_inference's --turns and --chat launches
def test_multi_turn_cli(ckpt, references, tmp_path):
    hf, tok = references
    n_new = int(flag(command("turns"), "--max_new_tokens"))
    assert "--chat" in command("turns")
    lines = run_block(command("turns"), ckpt, tmp_path).stdout.splitlines()
    messages = [t.removesuffix("\n") for t in split_turns((tmp_path / "turns.txt").read_text())]  # the block's file
    assert len(messages) > 1
    want = [f"{m!r} -> {r!r}" for m, r in zip(messages, hf_replies(hf, tok, messages, n_new))]
    assert lines[::2] == want
    assert len(lines) == 2 * len(messages) and all("time to first token" in line for line in lines[1::2])
