"""The DALI graph piece that reads a shard set (:mod:`dalikd.shards`) for one rank: what
:func:`dalikd.loaders.read` is for a folder, through DALI's ``fn.readers.webdataset``.

Sharding across ranks is DALI's, by samples: the split's shards are one sequence of samples
(manifest order, or this epoch's shuffled shard order) and rank i of n reads its contiguous
part; ``pad_last_batch`` repeats a rank's last sample so every rank has the same number of
samples, hence of batches (as the folder reader). Shuffling: the samples were shuffled once
when the shards were written; each epoch the shard order is reshuffled
(``shuffle_after_epoch``, one seed on every rank, so the ranks split one shared order) and
samples are drawn from a buffer of ``initial_fill`` (``random_shuffle``). docs/shards.md has
the facts checked on DALI 2.4.

The reader is named :data:`READER`, the name the PyTorch iterator (``reader_name``) and DALI
checkpointing look for; a checkpoint restores it bit-exactly mid-epoch.
"""

from __future__ import annotations

from typing import Any

from nvidia.dali import fn, types

from dalikd.shards import ID_EXT, IMAGE_EXTS, ShardSplit

READER = "Reader"  # must equal dalikd.loaders.READER (tests check it)
INITIAL_FILL = 1024  # samples in the shuffle buffer (DALI's default): encoded bytes per rank


def read_shards(
    split: ShardSplit,
    *,
    shuffle: bool,
    shard_id: int,
    num_shards: int,
    seed: int = 0,
    initial_fill: int = INITIAL_FILL,
) -> tuple[Any, Any, Any]:
    """Encoded images, int32 labels and int32 sample numbers of this rank's part of ``split``.

    Images: uint8 1-D (the file's bytes, CPU). Labels and numbers: int32 of shape (1,), as the
    folder reader's labels. A number names its sample: ``split.locate(number)`` is its shard
    and key (DALI's decoder errors do not say which sample failed). The same ``seed`` on every
    rank keeps the ranks' parts disjoint.
    """
    images, ids = fn.readers.webdataset(
        paths=split.tar_paths(),
        index_paths=split.index_paths(),
        ext=[";".join(sorted(set(IMAGE_EXTS.values()))), ID_EXT],
        dtypes=[types.UINT8, types.INT32],
        missing_component_behavior="error",  # an image-less sample: a clear error at build
        name=READER,
        shard_id=shard_id,
        num_shards=num_shards,
        pad_last_batch=True,
        random_shuffle=shuffle,
        initial_fill=initial_fill,
        shuffle_after_epoch=shuffle,
        seed=seed,
        **({"shuffle_after_epoch_seed": seed} if shuffle else {}),  # (DALI warns otherwise)
    )
    return images, ids[0:1], ids[1:2]
