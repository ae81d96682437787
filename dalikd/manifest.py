"""The dataset manifest, ``DIR/dataset.json``: what a dataset folder holds, beyond an
ImageNet-style tree of image files, and the data settings it was made for.

Two commands write one: ``dalikd data import`` (CIFAR-10/100, Tiny-ImageNet from their official
archives: layout "folder") and ``dalikd data shard`` (tar shards in the WebDataset layout:
layout "shards"). A plain ImageNet-style folder has none. The manifest is written last and
atomically, so a folder whose manifest exists is complete: a killed import or shard run leaves
no manifest that claims files which are not there.

``data_defaults`` are the dataset's own data settings, by their ``[data]`` config key (e.g.
``image_size``, the base view, the normalization ``mean``/``std``, the validation transform);
every command reads them unless a flag or a config file sets the key. This module only stores
them: which keys exist is the config's business (:mod:`dalikd.config`).

No DALI and no torch here: the CLI and the scan read manifests without either.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dalikd.errors import DalikdError

MANIFEST_NAME = "dataset.json"
MANIFEST_FORMAT = 1  # the layout of dataset.json; another is refused with one line

Layout = Literal["folder", "shards"]
# encoded: files DALI's image decoder reads (JPEG, PNG, ...); raw: uint8 HWC pixels, exactly
# image_shape bytes per image, no header (reshaped in the graph, nothing to decode)
Codec = Literal["encoded", "raw"]
LAYOUTS: tuple[str, ...] = ("folder", "shards")
CODECS: tuple[str, ...] = ("encoded", "raw")
# The file extension of a raw image (codec "raw"): one that no image decoder claims (.raw and
# .rgb are image formats), so nothing mistakes the headerless pixels for an encoded image.
RAW_EXTENSION = ".hwc"


@dataclass(frozen=True)
class Shard:
    """One tar shard of a split (layout "shards")."""

    name: str  # file name, relative to the manifest's folder (e.g. "train-00000.tar")
    samples: int  # images in the shard
    bytes: int  # file size
    sha256: str  # hex digest of the file


@dataclass(frozen=True)
class SplitInfo:
    samples: int  # images in the split
    per_class: tuple[int, ...]  # images of class i, in the manifest's class order
    shards: tuple[Shard, ...] = ()  # layout "shards" only


@dataclass(frozen=True)
class Manifest:
    name: str  # the dataset's name, e.g. "cifar100", or the source folder's name
    layout: Layout
    codec: Codec
    classes: tuple[str, ...]  # class names in label order
    splits: Mapping[str, SplitInfo]  # "train", "val" (a split may be absent)
    image_shape: tuple[int, int, int] | None = None  # (H, W, C) of raw images; None: encoded
    data_defaults: Mapping[str, Any] = field(default_factory=dict)  # [data] key -> value
    # where it came from: the archive (file name, bytes, sha256) or the source folder's listing
    # digest; shown by check-data, never interpreted
    source: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MANIFEST_FORMAT,
            "name": self.name,
            "layout": self.layout,
            "codec": self.codec,
            "image_shape": list(self.image_shape) if self.image_shape else None,
            "classes": list(self.classes),
            "splits": {
                name: {
                    "samples": s.samples,
                    "per_class": list(s.per_class),
                    "shards": [vars(sh) for sh in s.shards],
                }
                for name, s in self.splits.items()
            },
            "data_defaults": dict(self.data_defaults),
            "source": dict(self.source),
        }


def class_folders(classes: tuple[str, ...]) -> tuple[str, ...]:
    """The folder name of each class, in label order, for a layout "folder" dataset: the class
    names themselves where they sort into label order and are plain folder names, else
    ``NNN_name`` (the label, zero-padded) for every class. Either way, position in the sorted
    folder names = label (ImageFolder's convention, which the scan keeps)."""
    plain = all(c and c == c.strip() and "/" not in c and "\0" not in c
                and not c.startswith(".") for c in classes)  # fmt: skip
    if plain and list(classes) == sorted(set(classes)):
        return tuple(classes)
    width = len(str(max(len(classes) - 1, 0)))
    safe = ("".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in c) for c in classes)
    return tuple(f"{i:0{width}d}_{name}" for i, name in enumerate(safe))


def manifest_path(folder: str | Path) -> Path:
    return Path(folder) / MANIFEST_NAME


def write_manifest(manifest: Manifest, folder: str | Path) -> Path:
    """Write ``folder/dataset.json`` atomically (the last file a writer makes)."""
    from dalikd.atomic import write_text_atomic

    path = manifest_path(folder)
    write_text_atomic(json.dumps(manifest.to_dict(), indent=1) + "\n", path)
    return path


def read_manifest(folder: str | Path) -> Manifest | None:
    """``folder``'s manifest; None where it has no dataset.json. A damaged or foreign one is
    one line naming the file."""
    path = manifest_path(folder)
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:  # ValueError: bad JSON or bytes that are not UTF-8
        raise DalikdError(f"cannot read {path}: {e}") from None
    try:
        return _parse(raw)
    except (KeyError, TypeError, ValueError) as e:
        raise DalikdError(f"{path} is damaged: {e}") from None


def _parse(raw: Any) -> Manifest:
    if not isinstance(raw, dict):
        raise ValueError("not a table")
    if raw.get("format") != MANIFEST_FORMAT:
        raise ValueError(
            f"manifest format {raw.get('format')!r}; this dalikd reads format {MANIFEST_FORMAT}"
        )
    if raw["layout"] not in LAYOUTS or raw["codec"] not in CODECS:
        raise ValueError(f"layout {raw['layout']!r} / codec {raw['codec']!r}")
    classes = tuple(str(c) for c in raw["classes"])
    splits = {}
    for name, s in raw["splits"].items():
        per_class = tuple(int(n) for n in s["per_class"])
        if len(per_class) != len(classes) or sum(per_class) != int(s["samples"]):
            raise ValueError(f"split {name}: per_class does not match the classes or samples")
        shards = tuple(
            Shard(str(sh["name"]), int(sh["samples"]), int(sh["bytes"]), str(sh["sha256"]))
            for sh in s.get("shards", ())
        )
        splits[str(name)] = SplitInfo(int(s["samples"]), per_class, shards)
    shape = raw.get("image_shape")
    if raw["codec"] == "raw" and (not isinstance(shape, list) or len(shape) != 3):
        raise ValueError("a raw codec needs image_shape [H, W, C]")
    defaults = raw.get("data_defaults", {})
    source = raw.get("source", {})
    if not isinstance(defaults, dict) or not isinstance(source, dict):
        raise ValueError("data_defaults and source must be tables")
    return Manifest(
        name=str(raw["name"]),
        layout=raw["layout"],
        codec=raw["codec"],
        classes=classes,
        splits=splits,
        image_shape=tuple(int(v) for v in shape) if shape else None,  # type: ignore[arg-type]
        data_defaults=defaults,
        source=source,
    )
