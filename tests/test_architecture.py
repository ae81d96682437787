"""The import rules of docs/architecture.md: rooms import only along the arrows."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

SHARED = {"config", "errors", "batch", "device", "checkpoint", "metrics", "distributed",
          "rundir", "tensorboard", "plots", "cache", "outputs", "manifest", "atomic",
          "__init__"}  # fmt: skip
MODEL = {"models", "losses", "pick", "step", "teacher"}
DATA = {"data", "datacheck", "loaders", "ops", "recipes", "autoaugment", "native", "recovery",
        "plan"}  # fmt: skip
RUNS = {"train", "evaluate", "probe", "teacher_cache", "resume", "stop", "reporter"}
TOOLS = {"profile", "preview", "demo", "doctor"}
MAY_IMPORT = {  # room -> rooms its modules may import (their own included)
    "shared": {"shared"},
    "model": {"shared", "model"},
    "data": {"shared", "data"},
    "runs": {"shared", "model", "data", "runs"},
    "tools": {"shared", "model", "data", "runs", "tools"},
}


def room(module: str) -> str:
    top = module.split(".")[1] if module.count(".") else "__init__"
    for name, members in (("shared", SHARED), ("model", MODEL), ("data", DATA),
                          ("runs", RUNS), ("tools", TOOLS)):  # fmt: skip
        if top in members:
            return name
    raise AssertionError(f"{module} is in no room of docs/architecture.md: add it there")


def library_modules():
    for path in sorted((ROOT / "dalikd").rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__main__":  # `python -m dalikd` is the command: the door
            continue
        yield ".".join(parts[:-1] if parts[-1] == "__init__" else parts), path


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


@pytest.mark.parametrize(("module", "path"), list(library_modules()), ids=lambda v: str(v))
def test_rooms_import_along_the_arrows(module, path):
    mine = room(module)
    for imported in imports(path):
        top = imported.split(".")[0]
        assert top not in ("click", "rich"), f"{module} imports {imported}: only cli/ may"
        if imported.startswith("dalikd.cli"):
            raise AssertionError(f"{module} imports the CLI ({imported})")
        if top == "nvidia":
            assert mine in ("data", "runs", "tools"), f"{module} ({mine}) imports DALI"
        if top == "dalikd" and imported not in ("dalikd", "dalikd.pipelines"):
            theirs = room(imported)
            assert theirs in MAY_IMPORT[mine], f"{module} ({mine}) imports {imported} ({theirs})"


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
