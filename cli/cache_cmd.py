"""`dalikd cache-info`: what a teacher-output cache (--teacher-cache DIR) holds."""

from __future__ import annotations

import math

import click

from dalikd.cli.report import console


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


@click.command(name="cache-info")
@click.argument("cache_dir", type=click.Path())
def cache_info(cache_dir: str) -> None:
    """The key, the epochs and steps covered per rank, what the storage format changed of the
    soft targets (mean and p99 KL per epoch, measured as the chunks were written), the size on
    disk and per stored teacher row, and the projected size of ImageNet, 100 epochs, with this
    cache's recipe, in each format."""
    from dalikd.teacher_cache import DEFAULT_TOPK, LOSSY_BOUND, SIZE_TARGET, cache_info

    info = cache_info(cache_dir)
    say = lambda text: console.print(text, markup=False, soft_wrap=True)  # noqa: E731
    say(f"teacher cache {cache_dir}")
    for name, value in sorted(info["key"].items()):
        say(f"  {name:<18} {value}")
    if info["epochs"]:
        for epoch, ranks in info["epochs"].items():
            steps = ", ".join(f"rank {r}: {n} steps" for r, n in sorted(ranks.items()))
            kl = info["kl"].get(epoch)
            said = ""
            if kl and kl["rows"]:
                over = "  (above the warning bound)" if kl["mean"] > LOSSY_BOUND else ""
                said = (f"; KL(full || stored) mean {kl['mean']:.2e}, p99 <= {kl['p99']:.2e} "
                        f"nats{over}")  # fmt: skip
            say(f"epoch {epoch}: {steps}{said}")
    else:
        say("no training steps cached yet")
    say(f"format: {info['format']}")
    say(f"size on disk: {_gb(info['size_bytes'])} ({info['size_bytes']:,} bytes)")
    if not math.isnan(info["bytes_per_row"]):
        say(f"bytes per teacher row: {info['bytes_per_row']:.1f} ({info['rows']:,} rows)")
    p = info["imagenet"]
    k = info["key"].get("topk", 0)
    say(
        f"ImageNet projection (1,281,167 images, 1000 classes, batch 256, 100 epochs, "
        f"{info['imagenet_recipe']}, by format):"
    )
    for name, proj in info["imagenet_formats"].items():
        say(f"  {name:<11} {_gb(proj['total_bytes']):>10} ({proj['steps']:,} steps)")
    if info["format"] == "topk":
        verdict = "within" if p["total_bytes"] <= SIZE_TARGET else "over"
        say(
            f"this cache (top-K {k}): {p['steps']:,} steps, {_gb(p['train_bytes'])} + val "
            f"{_gb(p['val_bytes'])} = {_gb(p['total_bytes'])}, {verdict} "
            f"{_gb(SIZE_TARGET)}: the size the default --teacher-cache-topk {DEFAULT_TOPK} was "
            "chosen to fit (KD + CutMixPick). A guide, not a limit: nothing enforces it; a "
            "smaller --teacher-cache-topk makes a smaller cache (docs/teacher_cache.md)"
        )
