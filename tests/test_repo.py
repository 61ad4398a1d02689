"""Repository hygiene that users rely on."""

import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_environment_yml_pins_what_pyproject_needs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(project["dependencies"])
    assert "-e .[dev]" in pip
    assert project["requires-python"].startswith(">=" + python.split("=")[1])


def test_fms_is_used_through_its_hooks_not_patched():
    """fmsring registers an attention op and wraps models; it assigns nothing into FMS."""
    import re

    text = "\n".join(p.read_text() for p in sorted((ROOT / "fmsring").glob("*.py")))
    assert "register_attention_op(" in text
    assert not re.search(r"^\s*(fms|MultiHeadAttention|LLaMA\w*|RotaryEmbedding)(\.\w+)+\s*=[^=]", text, re.MULTILINE)
    assert not re.search(r"setattr\(\s*(fms|MultiHeadAttention|LLaMA)", text)
