from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def touch_image(path: Path, colour=(200, 100, 50), size=(8, 8)) -> Path:
    """Write a small solid image (or a text file, by extension)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".txt",):
        path.write_text("not an image")
        return path
    pixels = np.empty((*size, 3), np.uint8)
    pixels[:] = colour
    Image.fromarray(pixels).save(path, format="PNG" if path.suffix.lower() == ".png" else "JPEG")
    return path


def run_cli(args, capsys):
    """Run the `dalikd` entry point in-process: (exit code, stdout, stderr)."""
    from dalikd.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err
