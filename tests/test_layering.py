"""bdt's imports run one way (system §7): read every module's imports (ast, also
those inside functions; not those under `if TYPE_CHECKING:`) and fail on an import of a higher
layer, an import between two packages of one layer, a module no layer names, or a cycle."""

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "bdt"

# Bottom to top; each entry a layer of units (a package or module and what it holds, less the
# units named separately). Units of one layer do not import each other.
LAYERS = [
    ["bdt.processes", "bdt.entry"],
    ["bdt.storage"],
    ["bdt.url_listing", "bdt.config_file"],
    ["bdt.config", "bdt.weights", "bdt.output_dirs"],
    ["bdt.data", "bdt.model", "bdt.tokenizer"],
    ["bdt.training"],  # infrastructure shared by the training loops
    ["bdt.training.ar", "bdt.training.tokenizer", "bdt.extract"],  # the jobs
    ["bdt.generation"],
    ["bdt.eval"],
    ["bdt.commands", "bdt.train"],
    ["bdt.cli", "bdt.cluster"],
]
LAYER = {unit: i for i, layer in enumerate(LAYERS) for unit in layer}


def module_name(path: pathlib.Path, root: pathlib.Path = ROOT) -> str:
    parts = path.relative_to(root.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def unit_of(module: str) -> str | None:
    found = [u for u in LAYER if module == u or module.startswith(u + ".")]
    return max(found, key=len) if found else None


def _type_checking_only(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports(path: pathlib.Path, modules: set[str]) -> set[str]:
    """The bdt modules `path` imports (`from bdt.x import y` is bdt.x.y when that is a module)."""
    tree = ast.parse(path.read_text(), str(path))
    skipped = {id(n) for node in ast.walk(tree) if _type_checking_only(node)
               for n in ast.walk(node)}
    out = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.split(".")[0] == "bdt"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0 \
                and node.module.split(".")[0] == "bdt":
            subs = {f"{node.module}.{a.name}" for a in node.names} & modules
            out |= subs or {node.module}
    return out


def graph(root: pathlib.Path = ROOT) -> dict[str, set[str]]:
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {m: imports(p, set(files)) - {m} for m, p in files.items()}


def upward_imports(deps: dict[str, set[str]]) -> list[str]:
    """Imports of a higher layer or of another unit of the same layer."""
    wrong = []
    for module, targets in sorted(deps.items()):
        unit = unit_of(module)
        for dep in sorted(targets):
            target = unit_of(dep)
            if unit is None or target is None or target == unit:
                continue
            if LAYER[target] >= LAYER[unit]:
                wrong.append(f"{module} -> {dep} ({unit}: layer {LAYER[unit]}, "
                             f"{target}: layer {LAYER[target]})")
    return wrong


def cycles(deps: dict[str, set[str]]) -> list[str]:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    found = []

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for d in sorted(deps.get(m, ())):
            if state.get(d) == 1:
                found.append(" -> ".join(path[path.index(d):] + [d]))
            elif d in deps and d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(deps):
        if m not in state:
            visit(m, [m])
    return found


@pytest.fixture(scope="module")
def bdt_graph() -> dict[str, set[str]]:
    """bdt's imports, read once for the checks below (walking every module's tree takes
    about a second of a core)."""
    return graph()


def test_every_module_has_a_layer(bdt_graph):
    assert len(bdt_graph) > 80  # the walk found bdt
    assert sorted(m for m in bdt_graph if m != "bdt" and unit_of(m) is None) == []


def test_imports_run_down_the_layers(bdt_graph):
    assert upward_imports(bdt_graph) == []


def test_no_import_cycle(bdt_graph):
    assert cycles(bdt_graph) == []


def test_the_checks_see_an_upward_import_and_a_cycle(tmp_path):
    """The guard itself, on a scratch tree: data importing training (inside a function) and
    training importing data make one upward import and one cycle."""
    pkg = tmp_path / "bdt"
    (pkg / "data").mkdir(parents=True)
    (pkg / "training").mkdir()
    (pkg / "data" / "a.py").write_text("def f():\n    from bdt.training import b\n")
    (pkg / "training" / "b.py").write_text("from typing import TYPE_CHECKING\n"
                                           "from bdt.data import a\n"
                                           "if TYPE_CHECKING:\n    from bdt.cli import x\n")
    deps = graph(pkg)
    assert deps == {"bdt.data.a": {"bdt.training.b"}, "bdt.training.b": {"bdt.data.a"}}
    assert upward_imports(deps) == ["bdt.data.a -> bdt.training.b (bdt.data: layer 4, "
                                    "bdt.training: layer 5)"]
    assert cycles(deps) == ["bdt.data.a -> bdt.training.b -> bdt.data.a"]
