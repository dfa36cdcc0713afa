"""The package's import graph, read from the source with `ast` (nothing is imported): no circles among top-of-file
imports, and no import, at the top or inside a function, from a lower layer to a higher one."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The one statement of the layer order, lowest first: a module may import its own package and any lower layer; the
# packages that share a layer do not import each other. config imports nothing of ours and sits at the bottom, where any
# layer may use it (data reads the run config); metrics, checkpoint and run_dir (which reads the config and raises its
# ConfigError) sit just above it, below everything else; trackers (MetricsLog's rows to TensorBoard, wandb, MLflow,
# filed under run_dir's run id) above those; doctor, submit and label are commands, imported only by the CLI.
LAYERS = (
    ("config",),
    ("metrics", "checkpoint", "run_dir"),
    ("trackers",),
    ("algo", "data", "comm"),
    ("models",),
    ("engines",),
    ("workers",),
    ("orchestration",),
    ("trainers",),
    ("doctor", "submit", "supervise", "label"),
    ("cli",),
)
# A reference as a string, resolved at run time: `_lazy("rlhf_dist.doctor:run")`, reward.function in a YAML.
FUNCTION_REF = re.compile(r"\brlhf_dist(?:\.\w+)+:\w+\b")


def find_modules(src: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under `src / package`."""
    out = {}
    for path in sorted((src / package).rglob("*.py")):
        parts = path.relative_to(src).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    return "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, name: str, known: dict[str, Path]) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level) for every import in `path`; `from pkg import mod` names `pkg.mod`
    when that is a module. Imports in a function or under `if TYPE_CHECKING:` are not module level."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []

    def visit(node: ast.AST, top: bool) -> None:
        if isinstance(node, ast.Import):
            out.extend((a.name, node.lineno, top) for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module
            for a in node.names:
                sub = f"{mod}.{a.name}"
                out.append((sub if sub in known else mod, node.lineno, top))
        for child in ast.iter_child_nodes(node):
            inner = isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            inner = inner or (isinstance(node, ast.If) and _is_type_checking(node) and child in node.body)
            visit(child, top and not inner)

    visit(ast.parse(path.read_text(), str(path)), True)
    return out


def graph(src: Path, package: str) -> dict[str, list[tuple[str, int, bool]]]:
    """Module -> its imports of `package` modules (module level and function level)."""
    known = find_modules(src, package)
    return {
        m: [i for i in imports_of(p, m, known) if i[0] == package or i[0].startswith(package + ".")]
        for m, p in known.items()
    }


def cycles(edges: dict[str, list[tuple[str, int, bool]]]) -> list[list[str]]:
    """Import circles through module-level imports only (each as a path that returns to its start)."""
    nexts = {m: sorted({t for t, _, top in imps if top and t in edges}) for m, imps in edges.items()}
    state, stack, found = {}, [], []

    def dfs(m: str) -> None:
        state[m] = "open"
        stack.append(m)
        for t in nexts[m]:
            if state.get(t) == "open":
                found.append(stack[stack.index(t) :] + [t])
            elif t not in state:
                dfs(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(nexts):
        if m not in state:
            dfs(m)
    return found


def layer_of(module: str, layers=LAYERS) -> tuple[int, str] | None:
    """(layer index, top-level package) of `pkg.part.rest`; None for the root package itself."""
    parts = module.split(".")
    if len(parts) == 1:
        return None
    for i, layer in enumerate(layers):
        if parts[1] in layer:
            return i, parts[1]
    raise LookupError(f"{parts[0]}.{parts[1]} is in no layer; add it to LAYERS in {Path(__file__).name}")


def upward(edges: dict[str, list[tuple[str, int, bool]]], layers=LAYERS) -> list[str]:
    """Every import that points up the layers, or sideways into another package of the same layer."""
    bad = []
    for m, imps in sorted(edges.items()):
        src = layer_of(m, layers)
        for target, line, top in imps:
            dst = layer_of(target, layers)
            if src is None or dst is None or src[1] == dst[1]:
                continue
            if dst[0] >= src[0]:
                where = "top" if top else "in a function"
                bad.append(
                    f"{m}:{line} ({where}) imports {target}: layer {src[0]} {src[1]!r} -> layer {dst[0]} {dst[1]!r}"
                )
    return bad


# ---- the package --------------------------------------------------------------------------------------------------
EDGES = graph(ROOT, "rlhf_dist")


def test_no_import_circles_among_top_of_file_imports():
    assert cycles(EDGES) == [], "import circles (module-level imports):\n" + "\n".join(
        " -> ".join(c) for c in cycles(EDGES)
    )


def test_no_import_from_a_lower_layer_to_a_higher_one():
    bad = upward(EDGES)
    assert not bad, "imports against the layer order (tests/test_import_graph.py LAYERS):\n" + "\n".join(bad)


def test_every_package_has_a_layer_and_the_root_imports_nothing():
    placed = [p for layer in LAYERS for p in layer]
    assert len(placed) == len(set(placed)), "a package is in two layers"
    for m in EDGES:
        layer_of(m)  # raises for a package that is in no layer
    assert EDGES["rlhf_dist"] == []
    assert set(placed) == {m.split(".")[1] for m in EDGES if "." in m}, "LAYERS names a package that does not exist"


def test_every_import_and_function_reference_names_a_module_that_exists():
    """Also in tests/ and benchmarks/, and the `module:function` strings the CLI, configs and Ray jobs resolve late,
    which a rename breaks without any import error until the command runs."""
    known = find_modules(ROOT, "rlhf_dist")
    files = {**known, **{f"{d}.{p.stem}": p for d in ("tests", "benchmarks") for p in (ROOT / d).glob("*.py")}}
    missing = []
    for name, path in files.items():
        for target, line, _ in imports_of(path, name, known):
            if target.startswith("rlhf_dist") and target not in known:
                missing.append(f"{path.relative_to(ROOT)}:{line}: import {target}")
    for path in [*known.values(), *(ROOT / "configs").glob("*.yaml"), *(ROOT / "tests").glob("*.py")]:
        for ref in FUNCTION_REF.findall(path.read_text()):
            module, _, attr = ref.partition(":")
            tree = ast.parse(known[module].read_text()) if module in known else None
            defined = {n.name for n in getattr(tree, "body", []) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
            defined |= {
                t.id
                for n in getattr(tree, "body", [])
                if isinstance(n, ast.Assign)
                for t in n.targets
                if isinstance(t, ast.Name)
            }
            if attr not in defined:
                missing.append(f"{path.relative_to(ROOT)}: {ref}")
    assert not missing, "names that do not resolve:\n" + "\n".join(missing)


# Why an import may wait inside a function; anything else goes at the top of the file.
DEFERRED = {
    "vllm": "vllm is optional and heavy (and whatever imports it)",
    "deepspeed": "heavy, and must load after DS_ACCELERATOR is set",
    "ray": "a module the roles import: roles stay Ray-free",
    "cli": "imported to build the CLI's parser: `rlhf-dist config` loads neither torch nor Ray",
    "torch": "doctor reports a broken torch instead of failing on it",
    "matplotlib": "optional; its backend is chosen only when a plot is drawn",
    "trackers": "tensorboard, wandb, mlflow: optional (rlhf_dist[trackers]) and slow to import; loaded only when "
    "logging.trackers names them",
    "label": "`rlhf-dist label` serving collected pairs loads no torch; only on-demand sampling does",
    "transformers": "a reward actor scoring with a function or a service starts without it (~2 CPU-s per start)",
    "serve": "ray[serve] is optional (rlhf_dist[serve]) and slow to import; loaded only when reward.serve.enabled",
}


def test_every_import_inside_a_function_says_why():
    """`import x  # deferred: REASON`, one of DEFERRED: an import circle is not a reason."""
    unmarked = set()
    for path in find_modules(ROOT, "rlhf_dist").values():
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for inner in ast.walk(node):
                    line = lines[inner.lineno - 1] if isinstance(inner, (ast.Import, ast.ImportFrom)) else ""
                    marked = re.search(r"# deferred: (\w+)", line)
                    if line and (not marked or marked.group(1) not in DEFERRED):
                        unmarked.add(f"{path.relative_to(ROOT)}:{inner.lineno}: {line.strip()}")
    assert not unmarked, "move these to the top, or mark them `# deferred: REASON` (DEFERRED):\n" + "\n".join(
        sorted(unmarked)
    )


def _fresh_modules(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys; print(' '.join(sys.modules))"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return set(out.stdout.split())


def test_config_command_imports_neither_torch_nor_ray():
    """`rlhf-dist config` answers on a machine where only the config is at hand, and fast."""
    loaded = _fresh_modules(
        "import contextlib, io\nfrom rlhf_dist.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['config', 'configs/tiny_cpu.yaml']) == 0"
    )
    assert not {"torch", "ray", "transformers"} & loaded


def test_roles_import_neither_ray_nor_deepspeed():
    """A role is a plain class (Ray makes it an actor from outside), and DeepSpeed loads only once the process group
    has set DS_ACCELERATOR."""
    roles = sorted(m for m in EDGES if m.startswith("rlhf_dist.workers."))
    loaded = _fresh_modules("\n".join(f"import {m}" for m in roles))
    assert not {"ray", "deepspeed"} & loaded


def test_a_function_reward_actor_starts_without_transformers():
    """Every PPO run starts a reward actor; with a reward function (the default job) it needs no model code."""
    assert "transformers" not in _fresh_modules("import rlhf_dist.workers.reward")


# ---- the checker itself, on a made-up package -----------------------------------------------------------------------
def test_the_checker_finds_a_circle_and_an_upward_import(tmp_path):
    files = {
        "pkg/__init__.py": "",
        "pkg/low/__init__.py": "",
        "pkg/low/a.py": "from pkg.low import b\n",
        "pkg/low/b.py": "import pkg.low.a\n\ndef f():\n    from pkg.high import c\n",
        "pkg/high/__init__.py": "",
        "pkg/high/c.py": "from ..low import a\nfrom pkg.low import b\n\ndef g():\n    from pkg.low.a import x\n",
        "pkg/side.py": "from pkg import low\n",
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    edges = graph(tmp_path, "pkg")
    assert edges["pkg.high.c"] == [("pkg.low.a", 1, True), ("pkg.low.b", 2, True), ("pkg.low.a", 5, False)]
    assert cycles(edges) == [["pkg.low.a", "pkg.low.b", "pkg.low.a"]]
    layers = (("low", "side"), ("high",))
    assert upward(edges, layers) == [
        "pkg.low.b:4 (in a function) imports pkg.high.c: layer 0 'low' -> layer 1 'high'",
        "pkg.side:1 (top) imports pkg.low: layer 0 'side' -> layer 0 'low'",
    ]
    with pytest.raises(LookupError, match="pkg.high is in no layer"):
        upward(edges, (("low", "side"),))
