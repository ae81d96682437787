"""`dalikd cache-info`: what a teacher-output cache (--teacher-cache DIR) holds."""

from __future__ import annotations

import click

from dalikd.cli.report import console


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@click.command(name="cache-info")
@click.argument("cache_dir", type=click.Path())
def cache_info(cache_dir: str) -> None:
    """The key, the epochs and steps covered per rank, the size on disk, the bytes per stored
    teacher row, and the projected size of ImageNet, 100 epochs, with this cache's recipe and
    top-K, against the 20 GB the default top-K was chosen to fit."""
    from dalikd.teacher_cache import DEFAULT_TOPK, SIZE_TARGET, cache_info

    info = cache_info(cache_dir)
    say = lambda text: console.print(text, markup=False, soft_wrap=True)  # noqa: E731
    say(f"teacher cache {cache_dir}")
    for name, value in sorted(info["key"].items()):
        say(f"  {name:<18} {value}")
    if info["epochs"]:
        for epoch, ranks in info["epochs"].items():
            steps = ", ".join(f"rank {r}: {n} steps" for r, n in sorted(ranks.items()))
            say(f"epoch {epoch}: {steps}")
    else:
        say("no training steps cached yet")
    say(f"size on disk: {_gb(info['size_bytes'])} ({info['size_bytes']:,} bytes)")
    say(f"bytes per teacher row: {info['bytes_per_row']:.1f} ({info['rows']:,} rows)")
    p = info["imagenet"]
    k = info["key"].get("topk", 0)
    verdict = "within" if p["total_bytes"] <= SIZE_TARGET else "over"
    say(
        f"ImageNet projection (1,281,167 images, 1000 classes, batch 256, 100 epochs, "
        f"{info['imagenet_recipe']}, top-K {k or 'full'}): {p['steps']:,} steps, "
        f"{_gb(p['train_bytes'])} + val {_gb(p['val_bytes'])} = {_gb(p['total_bytes'])}, "
        f"{verdict} {_gb(SIZE_TARGET)}: the size the default --teacher-cache-topk "
        f"{DEFAULT_TOPK} was chosen to fit (KD + CutMixPick). A guide, not a limit: nothing "
        "enforces it; a smaller --teacher-cache-topk makes a smaller cache "
        "(docs/teacher_cache.md)"
    )
