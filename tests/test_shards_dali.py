"""What DALI 2.4's fn.readers.webdataset does on CPU (docs/shards.md, "DALI 2.4 facts,
checked"), one test per fact, so a DALI upgrade that changes one fails here; then the shard
reader of dalikd.shard_source over shards that dalikd.shards wrote."""

import io
import tarfile
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy
from PIL import Image
from test_shards import make_source, read_split

from dalikd.shard_source import READER, read_shards
from dalikd.shards import index_name, sample_members, shard_split
from dalikd.shardwrite import shard_dataset


def jpeg(i: int) -> bytes:
    pixels = (np.random.default_rng(i).random((8 + i % 4, 10, 3)) * 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def write_tar(path: Path, members) -> Path:
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def dalikd_tars(folder: Path, sizes=(7, 8, 9)) -> list[Path]:
    """Tars of dalikd's members, sample numbers 0.. across them (label = number % 4)."""
    paths, number = [], 0
    for s, n in enumerate(sizes):
        members = []
        for _ in range(n):
            members += [
                (name, data) for _, name, data in sample_members(number, number % 4, jpeg(number))
            ]
            number += 1
        paths.append(write_tar(folder / f"s{s}.tar", members))
    return paths


def wds2idx(tar: Path) -> Path:
    """DALI's own index tool (wds2idx.py, in DALI's wheel)."""
    from wds2idx import IndexCreator

    idx = tar.with_suffix(".idx")
    with IndexCreator(str(tar), str(idx), verbose=False) as creator:
        creator.create_index()
    return idx


def pipe(paths, index=True, *, ext=("jpg", "dalikd"), dtypes=(types.UINT8, types.INT32),
         batch=4, decode=False, checkpoint=None, **reader):  # fmt: skip
    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=1,
                  enable_checkpointing=True)  # fmt: skip
    def graph():
        outs = fn.readers.webdataset(
            paths=[str(p) for p in paths],
            index_paths=[str(wds2idx(Path(p))) for p in paths] if index is True else index,
            ext=list(ext), dtypes=list(dtypes), name=READER, **reader,
        )  # fmt: skip
        outs = list(outs) if isinstance(outs, list | tuple) else [outs]
        if decode:
            outs[0] = fn.decoders.image(outs[0])
        return tuple(outs)

    p = graph(checkpoint=checkpoint)
    p.build()
    return p


def numbers(out) -> list[int]:
    """Sample numbers of a batch of the "dalikd" output (the last one)."""
    return [int(np.array(out[-1][i])[1]) for i in range(len(out[-1]))]


def iterate(p, epochs, policy=LastBatchPolicy.PARTIAL, names=("ids",)):
    """Per epoch, the sample numbers a rank's iterator yields, batch by batch."""
    it = DALIGenericIterator([p], list(names), reader_name=READER, last_batch_policy=policy,
                             auto_reset=True)  # fmt: skip
    return [[b[0][names[-1]].reshape(-1).tolist() for b in it] for _ in range(epochs)]


def ids_graph(paths, **reader):
    """A pipeline whose one output is each sample's number, shape (1,)."""

    @pipeline_def(batch_size=reader.pop("batch", 4), num_threads=1, device_id=None, seed=1)
    def graph():
        _, ids = fn.readers.webdataset(
            paths=[str(p) for p in paths], index_paths=[str(wds2idx(p)) for p in paths],
            ext=["jpg", "dalikd"], dtypes=[types.UINT8, types.INT32], name=READER, **reader,
        )  # fmt: skip
        return ids[1:2]

    return graph()


def file_ids_graph(folder: Path, n: int = 24, **reader):
    """readers.file over ``n`` JPEG files, labels = their numbers: the folder reader's twin."""
    files = []
    for i in range(n):
        files.append(str(folder / f"{i:03d}.jpg"))
        Path(files[-1]).write_bytes(jpeg(i))

    @pipeline_def(batch_size=4, num_threads=1, device_id=None, seed=1)
    def graph():
        _, labels = fn.readers.file(files=files, labels=list(range(n)), name=READER, **reader)
        return labels

    return graph()


@pytest.fixture
def tars(tmp_path):
    return dalikd_tars(tmp_path)  # 24 samples in 3 tars of 7, 8, 9


# -- the index file -----------------------------------------------------------------------------


def test_dalikd_index_files_equal_dalis_wds2idx(tmp_path):
    out = tmp_path / "out"
    shard_dataset(make_source(tmp_path / "src"), out, shard_size=8 << 10)
    for tar in sorted(out.glob("*.tar")):
        ours = (out / index_name(tar.name)).read_text()
        assert wds2idx(tar).read_text() == ours  # wds2idx overwrote our file with its own


def test_the_index_file_is_optional_and_versions_1_1_and_1_2_are_read(tars, tmp_path):
    with_index = pipe(tars[:1], batch=7).run()
    without = pipe(tars[:1], index=None, batch=7).run()  # DALI parses the tar at start
    assert numbers(with_index) == numbers(without) == list(range(7))
    lines = wds2idx(tars[0]).read_text().splitlines()
    v11 = ["v1.1 7"] + [" ".join(f for j, f in enumerate(line.split()) if j % 4 != 3)
                        for line in lines[1:]]  # fmt: skip  # no member names
    (tmp_path / "v11.idx").write_text("\n".join(v11) + "\n")
    assert numbers(pipe(tars[:1], [str(tmp_path / "v11.idx")], batch=7).run()) == list(range(7))
    (tmp_path / "v13.idx").write_text("\n".join(["v1.3 7", *lines[1:]]) + "\n")
    with pytest.raises(RuntimeError, match=r"Unsupported version of the index file \(v1.3\)"):
        pipe(tars[:1], [str(tmp_path / "v13.idx")])


def test_a_wrong_index_is_trusted_or_fails_late(tars, tmp_path):
    """DALI checks only the index's form: a stale size feeds wrong bytes without a word, an
    offset past the end fails when that sample is read, a misaligned offset at build."""
    lines = wds2idx(tars[0]).read_text().splitlines()

    def edited(field, change):
        fields = lines[2].split()
        fields[field] = str(change(int(fields[field])))
        path = tmp_path / f"edit{field}.idx"
        path.write_text("\n".join([lines[0], lines[1], " ".join(fields), *lines[3:]]) + "\n")
        return [str(path)]

    out = pipe(tars[:1], edited(2, lambda size: size + 1000), batch=7).run()
    assert len(np.array(out[0][1])) == len(jpeg(1)) + 1000  # the next members' bytes too
    p = pipe(tars[:1], edited(1, lambda offset: 10**9), batch=2)  # builds fine
    with pytest.raises(RuntimeError, match="offset is outside of the archive file"):
        p.run()
    with pytest.raises(RuntimeError, match="not a multiple of tar block size"):
        pipe(tars[:1], edited(1, lambda offset: offset + 3))


# -- members and outputs ------------------------------------------------------------------------


def test_extensions_map_members_to_outputs(tmp_path):
    """The extension is the name after the first dot of its last path part; an output takes a
    ';'-separated set of extensions; matching is case-sensitive; a member no output names is
    ignored; names starting with a dot are no sample."""
    ids = np.array([1, 2], "<i4").tobytes()
    tar = write_tar(tmp_path / "x.tar", [
        ("a.jpg", jpeg(0)), ("a.dalikd", ids), ("a.cls", b"1"),
        ("b.png", b"\x89PNG"), ("b.dalikd", ids),
        ("c.JPG", jpeg(1)), ("c.dalikd", ids),
        ("d.x.jpg", jpeg(2)), ("d.x.dalikd", ids),
        ("dir/e.jpg", jpeg(3)), ("dir/e.dalikd", ids),
        (".hidden.jpg", jpeg(4)), (".hidden.dalikd", ids),
    ])  # fmt: skip
    out = pipe([tar], ext=("jpg;png", "dalikd"), batch=5).run()
    sizes = [len(np.array(out[0][i])) for i in range(5)]
    assert sizes == [len(jpeg(0)), 4, 0, 0, len(jpeg(3))]  # c.JPG, d.x.jpg: no "jpg" member
    assert out[0][0].source_info() == f"{tar}:512:a.jpg"  # source info: path:offset:name
    assert out[0][4].source_info() == f"{tar}:{out[0][4].source_info().split(':')[1]}:dir/e.jpg"


def test_missing_component_behavior(tmp_path):
    members = [(n, d) for i in (0, 1, 2) for _, n, d in sample_members(i, i, jpeg(i))]
    tar = write_tar(tmp_path / "m.tar", [m for m in members if m[0] != "000000001.jpg"])
    for behaviour in ("", "empty"):  # the default: an empty image, the sample kept
        out = pipe([tar], None, batch=3, missing_component_behavior=behaviour).run()
        assert numbers(out) == [0, 1, 2] and len(np.array(out[0][1])) == 0
    out = pipe([tar], None, batch=2, missing_component_behavior="skip").run()
    assert numbers(out) == [0, 2]  # dropped without a word: the epoch shrinks
    with pytest.raises(RuntimeError, match='Underful sample detected at tar file at ".*m.tar"'):
        pipe([tar], None, missing_component_behavior="error")
    with pytest.raises(RuntimeError, match="component size and dtype incompatible"):
        pipe([tar], None, ext=("jpg", "cls"))  # "1" as int32: 1 byte is no multiple of 4


def test_a_corrupted_member_kills_the_pipeline_without_naming_the_sample(tmp_path):
    members = [(n, d) for i in (0, 1) for _, n, d in sample_members(i, i, jpeg(i))]
    members[3] = (members[3][0], b"\xff\xd8\xff" + bytes(len(members[3][1]) - 3))
    tar = write_tar(tmp_path / "c.tar", members)
    p = pipe([tar], decode=True, batch=2)
    with pytest.raises(RuntimeError) as failure:
        p.run()
    message = str(failure.value)
    assert "decoders.image" in message and "000000001" not in message and "c.tar" not in message
    with pytest.raises(RuntimeError):  # a pipeline that failed is dead
        p.run()


def test_a_truncated_shard(tars, tmp_path):
    """With its index: builds, then fails at the first sample past the end. Without: at build."""
    data = tars[0].read_bytes()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(data[: len(data) // 2])
    p = pipe([cut], [str(wds2idx(tars[0]))], batch=2)
    numbers(p.run())
    with pytest.raises(RuntimeError, match="offset is outside of the archive file"):
        for _ in range(4):
            p.run()
    with pytest.raises(RuntimeError, match="Invalid seek"):
        pipe([cut], None)
    (tmp_path / "empty.tar").write_bytes(b"")
    with pytest.raises(RuntimeError, match="File mapping failed"):
        pipe([tmp_path / "empty.tar"], None)


# -- sharding, shuffling, padding, checkpoints --------------------------------------------------


def test_sharding_splits_samples_not_tar_files(tars):
    """Rank i of n reads samples [floor(N i / n), floor(N (i+1) / n)) of the tars' joined
    sequence (the same rule as readers.file), whatever the tar boundaries; without
    stick_to_shard the ranks move on to the next part each epoch (PARTIAL: the padding of
    pad_last_batch is not handed out)."""
    for n in (2, 5):
        parts = [iterate(ids_graph(tars, shard_id=r, num_shards=n, pad_last_batch=True), 2)
                 for r in range(n)]  # fmt: skip
        for r in range(n):
            first = sum(parts[r][0], [])
            assert first == list(range(24 * r // n, 24 * (r + 1) // n))
            second = sum(parts[r][1], [])
            assert second == list(range(24 * ((r + 1) % n) // n, 24 * ((r + 1) % n + 1) // n))


def test_pad_last_batch_gives_every_rank_the_same_batches(tars, tmp_path):
    """FILL with pad_last_batch: each rank's part is padded with its own last sample, then the
    last batch filled with it; every rank has the same number of batches."""
    parts = [iterate(ids_graph(tars, shard_id=r, num_shards=5, pad_last_batch=True), 1,
                     LastBatchPolicy.FILL)[0] for r in range(5)]  # fmt: skip
    assert [len(p) for p in parts] == [2] * 5
    assert sum(parts[0], []) == [0, 1, 2, 3, 3, 3, 3, 3]  # 4 samples, padded to 5, then to 8
    assert sum(parts[4], []) == [19, 20, 21, 22, 23, 23, 23, 23]
    partial = [iterate(ids_graph(tars, shard_id=r, num_shards=5, pad_last_batch=True), 1)[0]
               for r in range(5)]  # fmt: skip
    # PARTIAL: the same number of batches too, but a shorter part ends in an EMPTY batch
    assert partial[0] == [[0, 1, 2, 3], []] and partial[1] == [[4, 5, 6, 7], [8]]
    folder = iterate(file_ids_graph(tmp_path, shard_id=0, num_shards=5, pad_last_batch=True), 1)
    assert folder[0] == partial[0]  # the folder reader does the same


def test_drop_with_padding_leaks_a_padding_batch_into_the_next_epoch(tars, tmp_path):
    """A DALI quirk, readers.file's too: DROP with pad_last_batch, where a rank's own part
    fills whole batches but the padded part does not, leaves a batch of padding queued; it is
    the next epoch's only batch."""
    epochs = iterate(ids_graph(tars, shard_id=0, num_shards=5, pad_last_batch=True), 3,
                     LastBatchPolicy.DROP)  # fmt: skip
    assert epochs == [[[0, 1, 2, 3]], [[3, 3, 3, 3]], [[4, 5, 6, 7]]]
    folder = file_ids_graph(tmp_path, shard_id=0, num_shards=5, pad_last_batch=True)
    assert iterate(folder, 3, LastBatchPolicy.DROP) == epochs


def test_shuffles(tars):
    """random_shuffle draws from a buffer of initial_fill; shuffle_after_epoch reshuffles the
    order of the tar files each epoch (already in the first). With one
    shuffle_after_epoch_seed on every rank, the ranks' parts are disjoint every epoch; with
    different seeds they overlap."""

    def epochs(seeds, n=2):
        shuffled = dict(random_shuffle=True, initial_fill=6, shuffle_after_epoch=True)
        return [iterate(ids_graph(tars, shard_id=r, num_shards=n, seed=r + 1,
                                  shuffle_after_epoch_seed=seeds[r], **shuffled), 3)
                for r in range(n)]  # fmt: skip

    shared = epochs((9, 9))
    for e in range(3):
        assert Counter(i for rank in shared for batch in rank[e] for i in batch) == Counter(
            range(24)
        )
    assert len({tuple(sum(shared[0][e], [])) for e in range(3)}) == 3
    split = epochs((9, 10))
    assert any(
        Counter(i for rank in split for batch in rank[e] for i in batch) != Counter(range(24))
        for e in range(3)
    )
    ranges = (range(0, 7), range(7, 15), range(15, 24))  # the three tars' samples
    tar_orders = []
    for epoch in iterate(ids_graph(tars, shuffle_after_epoch=True, shuffle_after_epoch_seed=9,
                                   batch=24), 4):  # fmt: skip
        order = epoch[0]
        tars_seen = list(dict.fromkeys(next(t for t, r in enumerate(ranges) if i in r)
                                       for i in order))  # fmt: skip
        assert order == [i for t in tars_seen for i in ranges[t]]  # whole tars, stored order
        tar_orders.append(tuple(tars_seen))
    assert len(set(tar_orders)) > 1


def test_stick_to_shard_keeps_a_rank_on_its_part_and_forbids_the_epoch_reshuffle(tars):
    """stick_to_shard: each rank reads its own part every epoch (so a node needs only its
    part's tars), shuffled only within the buffer of random_shuffle; with shuffle_after_epoch
    it fails at build. dalikd does not use it (docs/shards.md)."""
    for r, part in enumerate((range(0, 12), range(12, 24))):
        epochs = iterate(ids_graph(tars, shard_id=r, num_shards=2, stick_to_shard=True,
                                   random_shuffle=True, initial_fill=4), 3)  # fmt: skip
        assert all(sorted(sum(e, [])) == list(part) for e in epochs)
    with pytest.raises(RuntimeError, match="shuffle_after_epoch and stick_to_shard cannot"):
        ids_graph(tars, shard_id=0, num_shards=2, stick_to_shard=True, shuffle_after_epoch=True,
                  shuffle_after_epoch_seed=9).build()  # fmt: skip


def test_checkpoint_restores_the_reader_bit_exactly_mid_epoch(tars):
    shuffled = dict(random_shuffle=True, initial_fill=5, shuffle_after_epoch=True,
                    shard_id=1, num_shards=2, pad_last_batch=True)  # fmt: skip

    def run(checkpoint=None, stop=None):
        p = pipe(tars, decode=True, checkpoint=checkpoint, **shuffled)
        got = []
        for _ in range(9):  # 3 epochs of 3 batches (12 samples per rank)
            got.append(numbers(p.run()))
            if len(got) == stop:
                return got, p.checkpoint()
        return got, None

    reference, _ = run()
    for stop in (2, 4, 7):
        before, state = run(stop=stop)
        after, _ = run(checkpoint=state)
        assert before + after[: 9 - stop] == reference


def test_the_checkpoint_holds_no_paths(tars):
    """A DALI checkpoint restores into any tar files: a run must check that its data is the
    data it saved (the manifest) itself."""
    p = pipe(tars, random_shuffle=True)
    p.run()
    assert b".tar" not in p.checkpoint() and b"s0" not in p.checkpoint()


# -- dalikd's reader ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shard_set(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    source = make_source(root / "src", n_train=(9, 7, 7), n_val=(3, 2, 2))  # 23 train
    shard_dataset(source, root / "out", shard_size=10 << 10)
    return root / "out"


def truth(out: Path, split: str) -> dict[int, tuple[int, bytes]]:
    """number -> (label, image bytes), read from the tars with Python's tarfile."""
    found = {}
    for key, members in read_split(out, split):
        image = next(v for k, v in members.items() if k not in ("cls", "dalikd"))
        found[int(key)] = (int(members["cls"]), image)
    return found


def reader_pipe(split, *, batch=4, decode=False, checkpoint=None, **kw):
    @pipeline_def(batch_size=batch, num_threads=1, device_id=None, seed=3,
                  enable_checkpointing=True)  # fmt: skip
    def graph():
        images, labels, numbers = read_shards(split, **kw)
        if decode:
            images = fn.resize(fn.decoders.image_random_crop(images), resize_x=8, resize_y=8)
            return images, labels, numbers
        return images.shape(), labels, numbers

    return graph(checkpoint=checkpoint)


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("ranks", [1, 2, 3])
def test_read_shards_gives_every_sample_once_per_epoch(shard_set, shuffle, ranks):
    """Over an epoch the ranks together read every sample of the split once, with its label;
    each rank's part is padded with its own last sample, and every rank has the same number
    of batches (FILL, as the folder reader)."""
    split = shard_split(shard_set, "train")
    known = truth(shard_set, "train")
    assert len(known) == split.samples == 23
    its = [DALIGenericIterator(
        [reader_pipe(split, shuffle=shuffle, shard_id=r, num_shards=ranks, seed=7)],
        ["size", "labels", "numbers"], reader_name=READER, auto_reset=True,
        last_batch_policy=LastBatchPolicy.FILL) for r in range(ranks)]  # fmt: skip
    for _ in range(2):
        seen, lengths = Counter(), []
        for it in its:
            batches = list(it)
            lengths.append(len(batches))
            numbers = []
            for b in batches:
                d = b[0]
                assert d["labels"].dtype == d["numbers"].dtype == torch.int32
                assert d["labels"].shape == d["numbers"].shape == (4, 1)
                for size, label, number in zip(d["size"].reshape(-1).tolist(),
                                               d["labels"].reshape(-1).tolist(),
                                               d["numbers"].reshape(-1).tolist(),
                                               strict=True):  # fmt: skip
                    assert (label, size) == (known[number][0], len(known[number][1]))
                    numbers.append(number)
            distinct = list(dict.fromkeys(numbers))
            assert 23 // ranks <= len(distinct) <= -(-23 // ranks)
            assert numbers[len(distinct) :] == [distinct[-1]] * (len(numbers) - len(distinct))
            seen.update(distinct)
        assert seen == Counter(range(23))
        assert len(set(lengths)) == 1


def test_the_reader_has_the_folder_readers_name():
    from dalikd import loaders

    assert READER == loaders.READER


def test_read_shards_images_are_the_files(shard_set):
    split = shard_split(shard_set, "val")
    known = truth(shard_set, "val")
    p = reader_pipe(split, batch=7, shuffle=False, shard_id=0, num_shards=1)
    p.build()
    images, labels, numbers = p.run()
    for i in range(7):
        number = int(np.array(numbers[i])[0])
        assert int(np.array(labels[i])[0]) == known[number][0]
        assert number == i  # unshuffled: the stored order
    name, key = split.locate(int(np.array(numbers[6])[0]))
    assert key == "000000006" and name in {s.name for s in split.shards}


def test_read_shards_restores_mid_epoch_bit_exactly(shard_set):
    split = shard_split(shard_set, "train")
    kw = dict(shuffle=True, shard_id=1, num_shards=2, seed=5, initial_fill=6, decode=True)

    def run(stop=None, checkpoint=None):
        it = DALIGenericIterator([reader_pipe(split, checkpoint=checkpoint, **kw)],
                                 ["images", "labels", "numbers"], reader_name=READER,
                                 auto_reset=True, last_batch_policy=LastBatchPolicy.DROP,
                                 prepare_first_batch=False)  # fmt: skip
        got = []
        for _ in range(3):
            for b in it:
                got.append((b[0]["numbers"].reshape(-1).tolist(), b[0]["images"].numpy().copy()))
                if len(got) == stop:
                    return got, it.checkpoints()[0]
        return got, None

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference, _ = run()
        for stop in (1, 4):
            before, state = run(stop=stop)
            after, _ = run(checkpoint=state)
            both = before + after
            assert [n for n, _ in both[: len(reference)]] == [n for n, _ in reference]
            pairs = zip(both[: len(reference)], reference, strict=True)
            assert all(np.array_equal(a, b) for (_, a), (_, b) in pairs)
