"""The rules of docs/architecture.md: rooms import only along the arrows (the library, the
recipes in pipelines/ and the door, cli/); no module holds mutable state at module level; no
library module is over 500 lines and no function over 80."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SHARED = {"config", "errors", "batch", "device", "checkpoint", "metrics", "distributed",
          "rundir", "tensorboard", "plots", "cache", "outputs", "manifest", "atomic",
          "settings", "__init__"}  # fmt: skip
MODEL = {"models", "cifar_models", "losses", "pick", "step", "teacher"}
DATA = {"data", "datacheck", "loaders", "ops", "recipes", "autoaugment", "native", "recovery",
        "plan", "shards", "shardwrite", "shardcheck", "shard_source",
        "sources"}  # fmt: skip
RUNS = {"train", "evaluate", "probe", "teacher_cache", "resume", "stop", "reporter"}
TOOLS = {"profile", "preview", "demo", "doctor", "archives", "dataimport"}
MAY_IMPORT = {  # room -> rooms its modules may import (their own included)
    "shared": {"shared"},
    "model": {"shared", "model"},
    "data": {"shared", "data"},
    "runs": {"shared", "model", "data", "runs"},
    "tools": {"shared", "model", "data", "runs", "tools"},
}


def room(module: str) -> str:
    if module.startswith("dalikd.pipelines"):  # the recipes (pipelines/): graph functions
        return "data"
    if module.startswith("dalikd.cli"):  # cli/: the door
        return "door"
    top = module.split(".")[1] if module.count(".") else "__init__"
    for name, members in (("shared", SHARED), ("model", MODEL), ("data", DATA),
                          ("runs", RUNS), ("tools", TOOLS)):  # fmt: skip
        if top in members:
            return name
    raise AssertionError(f"{module} is in no room of docs/architecture.md: add it there")


# the installed package's folders: dalikd/, and pipelines/ and cli/ as dalikd.pipelines, dalikd.cli
FOLDERS = {"dalikd": "dalikd", "pipelines": "dalikd.pipelines", "cli": "dalikd.cli"}


def library_modules(folders=("dalikd", "pipelines")):
    """(dotted name, path) of every module in ``folders`` (the library: dalikd/ and the recipes;
    add "cli" for the door)."""
    for folder in folders:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__main__":  # `python -m dalikd` is the command: the door
                continue
            parts = parts[:-1] if parts[-1] == "__init__" else parts
            yield ".".join([FOLDERS[folder], *parts]), path


def _is_module(name: str) -> bool:
    return (ROOT / "dalikd" / f"{name}.py").is_file() or (ROOT / "dalikd" / name).is_dir()


def imports(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (lazy imports count too)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
            if node.module == "dalikd":  # modules only (not e.g. __version__)
                found |= {f"dalikd.{a.name}" for a in node.names if _is_module(a.name)}
    return found


@pytest.mark.parametrize(("module", "path"), list(library_modules(("dalikd", "pipelines", "cli"))),
                         ids=lambda v: str(v))  # fmt: skip
def test_rooms_import_along_the_arrows(module, path):
    mine = room(module)
    for imported in imports(path):
        top = imported.split(".")[0]
        if mine == "door":  # the door may import any room; only the door takes click and rich
            assert top != "dalikd" or imported in ("dalikd",) or room(imported), imported
            continue
        assert top not in ("click", "rich"), f"{module} imports {imported}: only cli/ may"
        if imported.startswith("dalikd.cli"):
            raise AssertionError(f"{module} imports the CLI ({imported})")
        if top == "nvidia":
            assert mine in ("data", "runs", "tools"), f"{module} ({mine}) imports DALI"
        if top == "dalikd" and imported not in ("dalikd", "dalikd.pipelines"):
            theirs = room(imported)
            assert theirs in MAY_IMPORT[mine], f"{module} ({mine}) imports {imported} ({theirs})"


def test_the_recipes_import_only_the_data_side_and_shared():
    """pipelines/ holds graph functions: ops, recipes, autoaugment and shared settings."""
    for module, path in library_modules(("pipelines",)):
        for imported in imports(path):
            if imported.startswith("dalikd."):
                assert room(imported) in ("data", "shared"), f"{module} imports {imported}"


def test_the_model_side_and_the_loop_import_without_dali():
    """With nvidia.dali unimportable, the model side, evaluate and train still import (DALI is
    imported where the loaders are built)."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[:2] == ['nvidia', 'dali']:\n"
        "            raise ImportError('blocked ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "import dalikd.step, dalikd.train, dalikd.evaluate, dalikd.models, dalikd.pick\n"
        "import dalikd.losses, dalikd.metrics, dalikd.checkpoint, dalikd.batch\n"
        "assert not any(m.startswith('nvidia.dali') for m in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


# -- no module-level mutable state ---------------------------------------------------------------

MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "deque", "Counter",
                 "bytearray", "WeakKeyDictionary", "WeakValueDictionary"}  # fmt: skip
MUTATORS = {"append", "extend", "insert", "update", "setdefault", "pop", "popitem", "clear",
            "add", "discard", "remove", "sort", "reverse", "__setitem__"}  # fmt: skip
AMBIENT = {"ContextVar", "WeakKeyDictionary", "WeakValueDictionary"}  # state by construction


def _call_name(node: ast.AST) -> str:
    if not isinstance(node, ast.Call):
        return ""
    f = node.func
    return f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", "")


def module_state(source: str) -> list[str]:
    """What makes a module hold state of its own: a ``global`` statement, an ambient container
    (ContextVar, weak dictionaries) at module level, or a module-level container that code
    mutates (a constant table nobody changes is fine; a memo of a pure function goes through
    functools, not a dict)."""
    tree = ast.parse(source)
    containers, found = set(), []
    for node in tree.body:
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            value = node.value
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if _call_name(value) in AMBIENT:
                found.append(f"a {_call_name(value)} at module level (line {node.lineno})")
            literal = (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)
            if isinstance(value, literal) or _call_name(value) in MUTABLE_CALLS:
                containers |= {t.id for t in targets if isinstance(t, ast.Name)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Global):
            found.append(f"global {', '.join(node.names)} (line {node.lineno})")
        f = getattr(node, "func", None)
        if (isinstance(node, ast.Call) and isinstance(f, ast.Attribute)
                and isinstance(f.value, ast.Name) and f.value.id in containers
                and f.attr in MUTATORS):  # fmt: skip
            found.append(f"{f.value.id}.{f.attr}() (line {node.lineno})")
        targets = getattr(node, "targets", None) or [getattr(node, "target", None)]
        if isinstance(node, ast.Assign | ast.AugAssign | ast.Delete):
            for t in targets:
                if isinstance(t, ast.Subscript) and getattr(t.value, "id", None) in containers:
                    found.append(f"{t.value.id}[...] assigned (line {node.lineno})")
    return found


@pytest.mark.parametrize(("module", "path"), list(library_modules(("dalikd", "pipelines", "cli"))),
                         ids=lambda v: str(v))  # fmt: skip
def test_no_module_level_mutable_state(module, path):
    assert module_state(path.read_text()) == [], module


def test_the_state_check_finds_what_it_is_for():
    source = (
        "from contextvars import ContextVar\nimport weakref\n"
        "_PATH = ContextVar('p')\n_DRAWS = weakref.WeakKeyDictionary()\n"
        "_MEMO = {}\nTABLE = {'a': 1}\n"
        "def f(k):\n    _MEMO[k] = 1\n\ndef g():\n    global N\n    N = 1\n"
        "def h():\n    return TABLE['a']\n"
    )
    found = module_state(source)
    assert len(found) == 4 and "_MEMO[...] assigned (line 8)" in found
    assert any("ContextVar" in f for f in found) and any("global N" in f for f in found)


# -- sizes -----------------------------------------------------------------------------------

MODULE_LINES, FUNCTION_LINES = 500, 80


@pytest.mark.parametrize(("module", "path"), list(library_modules()), ids=lambda v: str(v))
def test_no_library_module_over_500_lines_or_function_over_80(module, path):
    source = path.read_text()
    assert source.count("\n") <= MODULE_LINES, f"{module}: {source.count(chr(10))} lines"
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1
            assert length <= FUNCTION_LINES, f"{module}.{node.name}: {length} lines"


def _distiller_assignments(source: str) -> list[str]:
    """``x.attr = ...`` (or +=, setattr) where ``x`` names a distiller."""
    found = []
    for node in ast.walk(ast.parse(source)):
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, ast.AugAssign | ast.AnnAssign):
            targets = [node.target]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") == "setattr":
            targets = [ast.Attribute(value=node.args[0], attr="?")]
        for t in targets:
            if isinstance(t, ast.Attribute) and "distiller" in ast.unparse(t.value).lower():
                found.append(f"line {node.lineno}: {ast.unparse(t)}")
    return found


def test_nothing_assigns_to_a_distillers_attributes_from_outside():
    """The Distiller's student, teacher source and settings are its own: no module (the
    library's, the door's, the benchmarks', the tests') assigns to them, DDP wrapping
    included."""
    offenders = []
    for folder in ("dalikd", "pipelines", "cli", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path == ROOT / "dalikd" / "step.py":
                continue  # the Distiller's own class
            found = _distiller_assignments(path.read_text())
            offenders += [f"{path.relative_to(ROOT)} {where}" for where in found]
    assert offenders == []
    assert _distiller_assignments("run.distiller.student = wrap(s)\n") == [
        "line 1: run.distiller.student"
    ]
