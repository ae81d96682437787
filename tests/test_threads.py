import os
import subprocess
import sys


def test_the_command_makes_openmp_waits_passive_before_torch_loads():
    code = (
        "import os, sys\n"
        "from dalikd.cli.main import main\n"
        "assert 'torch' not in sys.modules\n"
        "try:\n    main(['--version'])\nexcept SystemExit:\n    pass\n"
        "print(os.environ['OMP_WAIT_POLICY'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("PASSIVE")
