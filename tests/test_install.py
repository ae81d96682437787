"""A non-editable install finds the built-in recipes and the command (not only from the repo)."""

import os
import subprocess
import sys
from pathlib import Path

from dalikd.native import SOURCES

REPO = Path(__file__).resolve().parents[1]


def test_wheel_install_has_pipelines_and_cli(tmp_path):
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--target", str(target), str(REPO)],
        check=True, capture_output=True, timeout=300, cwd=tmp_path,
    )  # fmt: skip
    assert (target / "dalikd" / "pipelines" / "flip.py").is_file()
    for module in (REPO / "dalikd").rglob("*.py"):  # every library module, subpackages too
        assert (target / module.relative_to(REPO)).is_file(), module
    for source in SOURCES:  # the native operator is compiled from them on first use
        assert (target / "dalikd" / "native" / source).is_file(), source
    assert not (target / "pipelines").exists() and not (target / "cli").exists()
    env = {**os.environ, "PYTHONPATH": str(target)}
    code = (
        "import dalikd, dalikd.recipes as r; "
        f"assert dalikd.__file__.startswith({str(target)!r}), dalikd.__file__; "
        "print(sorted(r.builtin_recipes()))"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "'flip'" in proc.stdout and "'none'" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "dalikd", "pipelines"], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and "identity" in proc.stdout, proc.stderr
