"""Repository hygiene that users rely on."""

import ast
import sys
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_environment_yml_pins_what_pyproject_needs():
    project = PROJECT["project"]
    extras = project["optional-dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    wanted = project["dependencies"] + extras["harness"] + [d for d in extras["dev"] if not d.startswith("fmsring")]
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(wanted)
    assert "-e .[dev]" in pip
    assert project["requires-python"].startswith(">=" + python.split("=")[1])


def test_dependencies_are_split_by_who_needs_them():
    """The library needs torch and ibm-fms only; the harness's tools are an extra; dev pulls in the harness."""
    project = PROJECT["project"]
    names = [d.split(">")[0].split("=")[0] for d in project["dependencies"]]
    assert names == ["torch", "ibm-fms"]
    assert "fmsring[harness]" in project["optional-dependencies"]["dev"]
    assert any(d.startswith("transformers") for d in project["optional-dependencies"]["dev"])
    assert "cuda" in PROJECT["tool"]["pytest"]["ini_options"]["markers"][0]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def test_library_and_bench_import_only_core_dependencies():
    """So fmsring and ``python -m fmsring.bench`` run where only torch and ibm-fms are installed
    (a GPU machine); pandas, matplotlib, tqdm and yaml stay in the harness's sweep and analysis.
    Triton comes with torch on CUDA; fmsring imports its kernel only where Triton is installed."""
    core = {"torch", "fms", "fmsring", *sys.stdlib_module_names}
    if_present = {"decode_kernel.py": {"triton"}}
    bench = ["bench", "ceilings", "exactness", "flops", "peers", "ranks", "schema", "session", "timing"]
    files = [*sorted((ROOT / "fmsring").glob("*.py")), *(ROOT / "fmsring" / "harness" / f"{m}.py" for m in bench)]
    for path in files:
        allowed = core | if_present.get(path.name, set())
        assert _imports(path) <= allowed, (path.name, _imports(path) - allowed)


def test_fms_is_used_through_its_hooks_not_patched():
    """fmsring registers an attention op and wraps models; it assigns nothing into FMS."""
    import re

    text = "\n".join(p.read_text() for p in sorted((ROOT / "fmsring").glob("*.py")))
    assert "register_attention_op(" in text
    assert not re.search(r"^\s*(fms|MultiHeadAttention|LLaMA\w*|RotaryEmbedding)(\.\w+)+\s*=[^=]", text, re.MULTILINE)
    assert not re.search(r"setattr\(\s*(fms|MultiHeadAttention|LLaMA)", text)


def test_fmsring_imports_without_triton():
    """A CPU-only torch has no Triton: fmsring still imports, and decode attends in fp32 math."""
    import subprocess

    code = (
        "import sys; sys.modules['triton'] = None\n"  # what importlib then finds: nothing
        "import fmsring, fmsring.kernels as k, torch\n"
        "assert k.split_kv_decode is None and 'fmsring.decode_kernel' not in sys.modules\n"
        "assert k.decode_split_kv(torch.ones(1, dtype=torch.int32), torch.zeros(1, 64, 2, 8)) is None\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
