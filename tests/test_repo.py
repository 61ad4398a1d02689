"""Repository hygiene that users rely on."""

import ast
import sys
import tomllib
from pathlib import Path

import yaml

from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
PACKAGE = ROOT / "fmsring"
HARNESS = PACKAGE / "harness"
BENCH_DEPENDENCIES = {"torch", "ibm-fms", "psutil"}  # distribution names; what the bench may import:
BENCH_IMPORTS = {"torch", "fms", "psutil"}
# the demo extra's modules (the real checkpoint, make demo) and what they may import besides the core
DEMO_MODULES = {"fmsring.checkpoints", "fmsring.demo"}
DEMO_IMPORTS = {"transformers", "gguf"}


def test_environment_yml_pins_what_pyproject_needs():
    project = PROJECT["project"]
    extras = project["optional-dependencies"]
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    wanted = project["dependencies"] + extras["harness"] + extras["demo"]
    wanted += [d for d in extras["dev"] if not d.startswith("fmsring")]
    assert sorted(p for p in pip if not p.startswith("-e")) == sorted(wanted)
    assert "-e .[dev]" in pip
    assert project["requires-python"].startswith(">=" + python.split("=")[1])


def test_dependencies_are_split_by_who_needs_them():
    """The library needs torch and ibm-fms (the bench psutil too, which GPU images have); the harness's
    tools and the demo's transformers are extras; dev pulls in both."""
    project = PROJECT["project"]
    names = [d.split(">")[0].split("=")[0] for d in project["dependencies"]]
    assert names[:2] == ["torch", "ibm-fms"] and set(names) <= BENCH_DEPENDENCIES
    assert "fmsring[harness,demo]" in project["optional-dependencies"]["dev"]
    assert any(d.startswith("transformers") for d in project["optional-dependencies"]["demo"])
    assert "cuda" in PROJECT["tool"]["pytest"]["ini_options"]["markers"][0]


def test_make_test_is_the_fast_tier_and_test_all_everything():
    """CI runs ``make test`` (.ci/run): every test but the slow tier; ``make test-all`` adds it back."""
    recipes = {}
    for block in (ROOT / "Makefile").read_text().split("\n\n"):
        head, _, body = block.partition("\n")
        if ":" in head and body.startswith("\t"):
            recipes[head.split(":")[0]] = body.strip()
    assert 'pytest -m "not slow"' in recipes["test"]
    assert recipes["test-all"].endswith("pytest")
    assert recipes["test-gpu"].endswith("pytest -m cuda")
    assert any(m.startswith("slow:") for m in PROJECT["tool"]["pytest"]["ini_options"]["markers"])
    assert "make test" in (ROOT / ".ci" / "run").read_text()


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
    """So fmsring and ``python -m fmsring.bench`` run where only torch and ibm-fms (and psutil) are
    installed (a GPU machine); pandas, matplotlib, tqdm and yaml stay in the harness's sweep and
    analysis. The bench's modules are whatever ``fmsring.bench`` imports, directly or not. Triton
    comes with torch on CUDA; fmsring imports its kernel only where Triton is installed. The demo's
    modules read a real checkpoint with transformers (the demo extra); neither ``import fmsring``
    nor the bench imports them."""
    core = {"fmsring", *BENCH_IMPORTS, *sys.stdlib_module_names}
    if_present = {"fmsring.decode_kernel": {"triton"}, **dict.fromkeys(DEMO_MODULES, DEMO_IMPORTS)}
    paths = module_paths()
    library = {name for name, path in paths.items() if HARNESS not in path.parents}
    graph = import_graph()
    for name in sorted(library | needed_by(graph, "fmsring.bench")):
        allowed = core | if_present.get(name, set())
        assert _imports(paths[name]) <= allowed, (name, _imports(paths[name]) - allowed)
    assert not DEMO_MODULES & (needed_by(graph, "fmsring") | needed_by(graph, "fmsring.bench"))


def test_fms_is_used_through_its_hooks_not_patched():
    """fmsring registers an attention op and wraps models; it assigns nothing into FMS."""
    import re

    text = "\n".join(p.read_text() for p in sorted(PACKAGE.rglob("*.py")) if HARNESS not in p.parents)
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


# ---------------------------------------------------------------- the package's shape (issue 23)


def module_paths() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its ``__init__.py``)."""
    paths = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(ROOT).with_suffix("").parts
        paths[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return paths


def _lines(paths) -> int:
    return sum(len(p.read_text().splitlines()) for p in paths)


def import_graph() -> dict[str, set[str]]:
    """Which fmsring modules each fmsring module imports.

    Every import counts: at module level, inside a function, or under ``if TYPE_CHECKING:``. An
    import moved into a function or behind TYPE_CHECKING to dodge a cycle still has each module
    needing the other (the issue counts bench -> peers -> bench, a TYPE_CHECKING import, as a
    cycle). What does not count is the package ``__init__`` Python runs on the way to a submodule:
    ``fmsring/__init__.py`` re-exporting ``fmsring.model`` is no cycle with it.
    """
    modules = module_paths()
    graph = {}
    for name, path in modules.items():
        tree = ast.parse(path.read_text())
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                targets |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(
                        [*package.split(".")[: len(package.split(".")) - node.level + 1], *filter(None, [base])]
                    )
                # `from pkg import sub` imports the submodule pkg.sub; `from mod import name` imports mod
                targets |= {f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names}
        graph[name] = {t for t in targets if t in modules and t != name}
    return graph


def needed_by(graph: dict[str, set[str]], root: str) -> set[str]:
    """The modules importing ``root`` runs: its imports, theirs, and the packages on the way to each."""
    seen: set[str] = set()
    todo = [root]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            parts = name.split(".")
            todo += [".".join(parts[:i]) for i in range(1, len(parts))] + sorted(graph[name])
    return seen


def import_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as [a, b, ..., a], or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_import_graph_and_cycle_finder():
    assert import_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    graph = import_graph()
    assert {"fmsring.model", "fmsring.loading"} <= graph["fmsring"]  # a re-export is an edge from the package
    assert "fmsring" not in graph["fmsring.loading"]  # and the package's __init__ is no edge back
    assert "fmsring.harness.bench" in graph["fmsring.bench"]  # `from fmsring.harness.bench import main`
    assert {"fmsring", "fmsring.harness", "fmsring.harness.bench", "fmsring.model"} <= needed_by(graph, "fmsring.bench")


def test_no_import_cycle_in_the_package():
    assert import_cycle(import_graph()) is None


def test_no_module_over_400_lines_and_the_model_under_250():
    long = {name: n for name, path in module_paths().items() if (n := _lines([path])) > 400}
    assert not long, long
    assert _lines([PACKAGE / "model.py"]) < 250


def test_the_harness_is_smaller_than_the_library():
    harness = _lines(HARNESS.rglob("*.py"))
    library = _lines(p for p in PACKAGE.rglob("*.py") if HARNESS not in p.parents)
    assert harness < library, (harness, library)


def test_the_readme_is_a_guide_a_newcomer_reads_in_ten_minutes():
    """Full results live in docs/results.md (rendered from runs/), the state of each phase in docs/performance.md."""
    assert _lines([ROOT / "README.md"]) < 250


def test_no_merge_conflict_markers_are_committed():
    """A merge left half-resolved once shipped both sides of a table in docs/architecture.md."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    marked = []
    for name in files:
        if Path(name).suffix in (".md", ".py", ".toml", ".yaml", ".yml", ".sh", ".cfg") or name == "Makefile":
            text = (ROOT / name).read_text(errors="replace")
            if any(line.startswith(("<<<<<<< ", ">>>>>>> ")) for line in text.splitlines()):
                marked.append(name)
    assert not marked, f"conflict markers in {marked}"
