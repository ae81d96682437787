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


def run_graph(graph, inputs: dict, *, seed: int = 0, iters: int = 1, conditionals: bool = False):
    """Run ``graph(**nodes)`` in a CPU pipeline; ``inputs`` name -> per-sample arrays (the same
    every iteration); the key "images" gets layout HWC. Returns a list (per iteration) of
    tuples of [batch, ...] arrays."""
    from nvidia.dali import fn, pipeline_def

    batch = len(next(iter(inputs.values())))

    def constant(values):  # no parameters: DALI passes the epoch to callbacks that take one
        return lambda: list(values)

    def graph_fn():
        nodes = {
            k: fn.external_source(
                source=constant(v), batch=True, layout="HWC" if k == "images" else ""
            )
            for k, v in inputs.items()
        }
        out = graph(**nodes)
        return out if isinstance(out, tuple) else (out,)

    pipe = pipeline_def(graph_fn, enable_conditionals=conditionals)(
        batch_size=batch, num_threads=1, device_id=None, seed=seed
    )
    pipe.build()
    return [tuple(o.as_array() for o in pipe.run()) for _ in range(iters)]
