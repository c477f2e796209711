import io
import os
import re
import struct

import numpy as np
import pytest
import torch

from gif_kernels.train.data import RECORDIO_MAGIC, SYNTHETIC_IMAGES_PER_ID, load_data, write_recordio


@pytest.fixture
def Image():
    return pytest.importorskip("PIL.Image")


def images_of(dataset, indices=None):
    indices = range(len(dataset)) if indices is None else indices
    return torch.stack([dataset[i][0] for i in indices])


def labels_of(dataset):
    return [dataset[i][1] for i in range(len(dataset))]


def as_input(pixels: np.ndarray) -> torch.Tensor:
    """What the loader makes of uint8 (H, W, 3) pixels."""
    return torch.from_numpy(pixels).permute(2, 0, 1).float() / 127.5 - 1


# ----------------------------------------------------------------------------------------------
# synthetic

def test_bogus_spec_names_data():
    for spec in ("bogus", "synthetic:x", "imagefolder", "recordio:", "images:/tmp"):
        with pytest.raises(ValueError, match="data"):
            load_data(spec)


@pytest.mark.parametrize("size", [16, 37])
def test_synthetic_shapes_and_labels(size):
    splits = load_data("synthetic", ids=5, image_size=size, images_per_id=3, holdout_per_id=2, verify_ids=4)
    assert splits.num_ids == 5 and splits.input_shape == (3, size, size) and splits.names is None
    assert (len(splits.train), len(splits.ident_test), len(splits.verify)) == (15, 10, 20)
    assert splits.train_labels.dtype == torch.int64
    assert splits.train_labels.tolist() == labels_of(splits.train) == [i // 3 for i in range(15)]
    assert labels_of(splits.ident_test) == [i // 2 for i in range(10)]
    assert labels_of(splits.verify) == [i // 5 for i in range(20)]
    image, label = splits.train[4]
    assert image.shape == (3, size, size) and image.dtype == torch.float32 and type(label) is int
    for dataset in splits[:3]:
        images = images_of(dataset)
        assert images.min() >= -1 and images.max() <= 1 and images.std() > 0.1


def test_synthetic_default_sizes():
    splits = load_data("synthetic", ids=30)
    assert splits.input_shape == (3, 112, 112)
    per_id = SYNTHETIC_IMAGES_PER_ID
    assert (len(splits.train), len(splits.ident_test), len(splits.verify)) == (30 * per_id, 30 * 2, 20 * (per_id + 2))


def test_synthetic_is_deterministic():
    def some_images(seed):
        splits = load_data("synthetic", ids=4, image_size=24, images_per_id=3, seed=seed)
        return [images_of(dataset, [0, 5, 2]) for dataset in splits[:3]]

    first, again, other = some_images(1), some_images(1), some_images(2)
    for a, b, c in zip(first, again, other):
        assert torch.equal(a, b)
        assert (a - c).abs().mean() > 0.1


def test_synthetic_getitems_matches_getitem():
    splits = load_data("synthetic", ids=10, image_size=20, images_per_id=5)
    indices = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(0)).tolist()
    indices += indices[:7]  # more than one rendering chunk, with repeats
    batch = splits.train.__getitems__(indices)
    assert [label for _, label in batch] == [splits.train[i][1] for i in indices]
    assert torch.equal(torch.stack([image for image, _ in batch]), images_of(splits.train, indices))
    with pytest.raises(IndexError):
        splits.train[len(splits.train)]
    images, labels = next(iter(torch.utils.data.DataLoader(splits.train, batch_size=8)))
    assert images.shape == (8, 3, 20, 20) and labels.tolist() == [0] * 5 + [1] * 3


def test_synthetic_splits_hold_different_images():
    splits = load_data("synthetic", ids=3, image_size=24, images_per_id=4, holdout_per_id=2, verify_ids=2)
    train, held_out = images_of(splits.train), images_of(splits.ident_test)
    assert (train[:, None] - held_out[None]).abs().flatten(2).mean(2).min() > 0.01
    # Verify holds identities 3 and 4 of the generator: the training identities of a larger set.
    larger = load_data("synthetic", ids=5, image_size=24, images_per_id=6, holdout_per_id=0)
    assert torch.equal(images_of(splits.verify), images_of(larger.train, range(18, 30)))


def test_synthetic_identities_are_closer_within_than_across():
    ids, per_id = 12, 6
    splits = load_data("synthetic", ids=ids, image_size=32, images_per_id=per_id)
    images = images_of(splits.train).flatten(1)
    distance = torch.cdist(images, images)
    same = splits.train_labels[:, None] == splits.train_labels[None, :]
    off_diagonal = ~torch.eye(len(images), dtype=torch.bool)
    within, across = distance[same & off_diagonal], distance[~same]
    assert within.min() > 0.1 * across.mean()  # images of one identity vary ...
    assert within.mean() < across.mean()  # ... but less than identities differ
    # Nearest class mean on raw pixels: far above chance, far from perfect.
    means = images.view(ids, per_id, -1).mean(1)
    held_out = images_of(splits.ident_test).flatten(1)
    accuracy = (torch.cdist(held_out, means).argmin(1) == torch.tensor(labels_of(splits.ident_test)))
    assert 2 / ids < accuracy.float().mean() < 0.9


# ----------------------------------------------------------------------------------------------
# the split of real data (through features, the quickest kind to make)

def write_features(path, labels, dim=4, seed=0):
    features = np.random.default_rng(seed).standard_normal((len(labels), dim)).astype(np.float32)
    np.savez(path, features=features, labels=np.array(labels))
    return features


def test_split_of_real_data(tmp_path):
    # Identity values 10, 20, ..., 80 with 1..8 images each, interleaved in file order.
    labels = [10 * k for round in range(8) for k in range(1, 9) if round < k]
    features = write_features(tmp_path / "f.npz", labels)
    spec = f"features:{tmp_path / 'f.npz'}"
    splits = load_data(spec, holdout_per_id=2, verify_ids=3, seed=5)
    assert splits.input_shape == (4,) and splits.num_ids == 5 and len(splits.names) == 5
    train_values = [int(name) for name in splits.names]
    assert train_values == sorted(train_values)  # labels follow the identities' original order
    assert min(labels.count(value) for value in train_values) <= 2  # one keeps all its images

    def rows(dataset):  # the file rows a dataset's items are, and their labels
        vectors = images_of(dataset).numpy()
        return [int(np.flatnonzero((features == vector).all(1))[0]) for vector in vectors], labels_of(dataset)

    train_rows, train_labels = rows(splits.train)
    test_rows, test_labels = rows(splits.ident_test)
    verify_rows, verify_labels = rows(splits.verify)
    assert splits.train_labels.tolist() == train_labels
    assert train_rows == sorted(train_rows) and test_rows == sorted(test_rows)
    for label, value in enumerate(train_values):
        items = [row for row, v in enumerate(labels) if v == value]
        held = items[-2:] if len(items) > 2 else []  # the last two, when there are more than two
        assert [r for r, l in zip(train_rows, train_labels) if l == label] == items[:len(items) - len(held)]
        assert [r for r, l in zip(test_rows, test_labels) if l == label] == held
    verify_values = sorted({labels[row] for row in verify_rows})
    assert len(verify_values) == 3 and not set(verify_values) & set(train_values)
    assert verify_labels == [verify_values.index(labels[row]) for row in verify_rows]
    assert sorted(verify_rows) == [row for row, v in enumerate(labels) if v in verify_values]

    assert load_data(spec, holdout_per_id=2, verify_ids=3, seed=5).names == splits.names
    assert len({tuple(load_data(spec, verify_ids=3, seed=seed).names) for seed in range(4)}) > 1


def test_split_options(tmp_path):
    write_features(tmp_path / "f.npz", [k for k in range(20) for _ in range(3)])
    spec = f"features:{tmp_path / 'f.npz'}"
    default = load_data(spec)
    assert default.num_ids == 18 and len(default.verify) == 2 * 3  # max(2, 20 // 10) held out
    some = load_data(spec, ids=7)
    assert some.num_ids == 7 and set(some.names) < set(default.names)
    everything = load_data(spec, verify_ids=0, holdout_per_id=0)
    assert everything.num_ids == 20 and len(everything.train) == 60
    assert len(everything.ident_test) == len(everything.verify) == 0
    with pytest.raises(ValueError, match="ids"):
        load_data(spec, ids=19)
    with pytest.raises(ValueError, match="verify_ids"):
        load_data(spec, verify_ids=20)


# ----------------------------------------------------------------------------------------------
# features

def test_features_folder_matches_npz(tmp_path):
    labels = [3, 1, 3, 2, 1, 3, 2, 2, 1, 3]
    features = write_features(tmp_path / "f.npz", labels, dim=6).astype(np.float16)
    np.save(tmp_path / "features.npy", features)
    np.save(tmp_path / "labels.npy", np.array(labels, np.int32))
    from_npz = load_data(f"features:{tmp_path / 'f.npz'}", verify_ids=1)
    from_folder = load_data(f"features:{tmp_path}", verify_ids=1)
    assert from_folder.names == from_npz.names and from_folder.input_shape == (6,)
    assert from_folder.train_labels.tolist() == from_npz.train_labels.tolist()
    vector, label = from_folder.train[0]
    assert vector.dtype == torch.float32 and vector.shape == (6,) and type(label) is int
    assert torch.allclose(images_of(from_folder.train), images_of(from_npz.train), atol=1e-2)


def test_features_errors(tmp_path):
    def npz(**arrays):
        np.savez(tmp_path / "bad.npz", **arrays)
        return f"features:{tmp_path / 'bad.npz'}"

    good = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match=r"features in .* must be a float \(n, D\) array"):
        load_data(npz(features=np.zeros(4, np.float32), labels=np.arange(4)))
    with pytest.raises(ValueError, match=r"features in .* must be a float \(n, D\) array"):
        load_data(npz(features=np.zeros((4, 3), np.int64), labels=np.arange(4)))
    with pytest.raises(ValueError, match=r"labels in .* must be an integer \(4,\) array"):
        load_data(npz(features=good, labels=np.arange(5)))
    with pytest.raises(ValueError, match=r"labels in .* must be an integer \(4,\) array"):
        load_data(npz(features=good, labels=np.arange(4.0)))
    with pytest.raises(ValueError, match=r"lacks arrays \['labels'\]"):
        load_data(npz(features=good))
    with pytest.raises(FileNotFoundError, match="missing"):
        load_data(f"features:{tmp_path / 'missing.npz'}")
    np.save(tmp_path / "features.npy", good)
    with pytest.raises(FileNotFoundError, match="labels.npy"):
        load_data(f"features:{tmp_path}")


# ----------------------------------------------------------------------------------------------
# imagefolder

def random_pixels(rng, size=16):
    return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)


def make_image_folder(root, Image, counts):
    """Identity folders named by `counts` with that many PNGs each; returns their pixels."""
    rng = np.random.default_rng(0)
    pixels = {}
    for name, count in counts.items():
        os.makedirs(root / name)
        for k in range(count):
            pixels[name, k] = random_pixels(rng)
            Image.fromarray(pixels[name, k]).save(root / name / f"{k:03d}.png")
    return pixels


def test_imagefolder(tmp_path, Image):
    counts = {"carol": 4, "alice": 3, "bob": 1, "dave": 5}
    pixels = make_image_folder(tmp_path, Image, counts)
    (tmp_path / "alice" / "notes.txt").write_text("not an image")
    Image.fromarray(random_pixels(np.random.default_rng(1), 24)).save(tmp_path / "bob" / "big.PNG")
    os.makedirs(tmp_path / "empty")  # no images: not an identity
    splits = load_data(f"imagefolder:{tmp_path}", image_size=16, holdout_per_id=2, verify_ids=0)
    assert splits.names == ["alice", "bob", "carol", "dave"] and splits.input_shape == (3, 16, 16)
    assert labels_of(splits.train) == [0, 1, 1, 2, 2, 3, 3, 3]
    assert labels_of(splits.ident_test) == [0, 0, 2, 2, 3, 3]
    assert splits.train_labels.tolist() == labels_of(splits.train)
    assert torch.equal(splits.train[0][0], as_input(pixels["alice", 0]))
    assert torch.equal(splits.ident_test[5][0], as_input(pixels["dave", 4]))
    assert splits.train[1][0].shape == (3, 16, 16)  # bob's 24 x 24 image, resized

    held = load_data(f"imagefolder:{tmp_path}", image_size=16)  # 4 identities: 2 for verify
    assert held.num_ids == 2 and len({*held.names}) == 2
    verify_names = sorted({"alice", "bob", "carol", "dave"} - set(held.names))
    assert len(held.verify) == sum(counts[name] + (name == "bob") for name in verify_names)


def test_imagefolder_errors(tmp_path, Image):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_data(f"imagefolder:{tmp_path / 'nowhere'}")
    with pytest.raises(ValueError, match="has no images"):
        load_data(f"imagefolder:{tmp_path}")
    os.makedirs(tmp_path / "alice")
    (tmp_path / "alice" / "readme.txt").write_text("text")
    with pytest.raises(ValueError, match="has no images"):
        load_data(f"imagefolder:{tmp_path}")
    Image.fromarray(random_pixels(np.random.default_rng(0))).save(tmp_path / "alice" / "a.png")
    (tmp_path / "alice" / "b.jpg").write_bytes(b"not a jpeg")
    splits = load_data(f"imagefolder:{tmp_path}", image_size=16, holdout_per_id=0)
    assert splits.train[0][0].shape == (3, 16, 16)
    with pytest.raises(ValueError, match="b.jpg"):
        splits.train[1]


# ----------------------------------------------------------------------------------------------
# recordio

def recordio_data(count=9):
    rng = np.random.default_rng(0)
    return [random_pixels(rng) for _ in range(count)], [42, 7, 42, 1000, 7, 42, 1000, 7, 42][:count]


@pytest.mark.parametrize("header_record", [True, False])
def test_recordio_round_trip(tmp_path, Image, header_record):
    images, labels = recordio_data()
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", images, labels,
                   header_record=header_record)
    splits = load_data(f"recordio:{tmp_path}", image_size=16, holdout_per_id=1, verify_ids=0)
    assert splits.names == ["7", "42", "1000"] and splits.input_shape == (3, 16, 16)
    # Records in file order; each identity's last record is held out.
    assert labels_of(splits.train) == [1, 0, 1, 2, 0, 1]
    assert labels_of(splits.ident_test) == [2, 0, 1]
    assert splits.train_labels.tolist() == labels_of(splits.train)
    assert torch.equal(images_of(splits.train), torch.stack([as_input(image) for image in images[:6]]))
    assert torch.equal(images_of(splits.ident_test), torch.stack([as_input(image) for image in images[6:]]))


def test_recordio_jpeg_and_rec_path(tmp_path, Image):
    images, labels = recordio_data()
    images = [np.full_like(image, 30 * k) for k, image in enumerate(images)]  # flat: JPEG keeps them
    write_recordio(tmp_path / "faces.rec", tmp_path / "faces.idx", images, labels, image_format="jpeg")
    splits = load_data(f"recordio:{tmp_path / 'faces.rec'}", image_size=32, holdout_per_id=0, verify_ids=0)
    assert len(splits.train) == 9 and splits.input_shape == (3, 32, 32)
    resized = torch.stack([as_input(image[:1, :1]).expand(3, 32, 32) for image in images])
    assert (images_of(splits.train) - resized).abs().max() < 0.05


def test_recordio_multi_part_record(tmp_path, Image):
    # A payload holding the magic number at a 4-byte boundary is stored in parts; the reader joins them.
    png = io.BytesIO()
    pixels = random_pixels(np.random.default_rng(0))
    Image.fromarray(pixels).save(png, format="png")
    encoded = png.getvalue() + bytes(-len(png.getvalue()) % 4) + struct.pack("<I", RECORDIO_MAGIC) + b"tail"
    write_recordio(tmp_path / "train.rec", tmp_path / "train.idx", [encoded, pixels], [5, 6])
    assert (tmp_path / "train.rec").read_bytes().count(struct.pack("<I", RECORDIO_MAGIC)) == 4
    splits = load_data(f"recordio:{tmp_path}", image_size=16, holdout_per_id=0, verify_ids=0)
    assert torch.equal(images_of(splits.train), torch.stack([as_input(pixels)] * 2))


def test_recordio_errors(tmp_path, Image):
    images, labels = recordio_data()
    with pytest.raises(FileNotFoundError, match="train.rec"):
        load_data(f"recordio:{tmp_path}")
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    write_recordio(rec, idx, images, labels)
    offsets = [int(line.split("\t")[1]) for line in idx.read_text().splitlines()]
    good = rec.read_bytes()

    rec.write_bytes(good[:offsets[4]] + b"\0\0\0\0" + good[offsets[4] + 4:])  # record 4 loses its magic
    with pytest.raises(ValueError, match=f"corrupt RecordIO record 4 in {re.escape(str(rec))}"):
        load_data(f"recordio:{tmp_path}")
    rec.write_bytes(good[:-20])  # the last record is cut short
    with pytest.raises(ValueError, match="corrupt RecordIO record 9"):
        load_data(f"recordio:{tmp_path}")
    rec.write_bytes(good)
    idx.write_text("".join(line + "\n" for line in idx.read_text().splitlines()[:-1]))  # record 9 unlisted
    with pytest.raises(ValueError, match="lacks some"):
        load_data(f"recordio:{tmp_path}")
    idx.write_text("0\tnot-a-number\n")
    with pytest.raises(ValueError, match="not a RecordIO index"):
        load_data(f"recordio:{tmp_path}")
    os.remove(idx)
    with pytest.raises(FileNotFoundError, match="train.idx"):
        load_data(f"recordio:{rec}")
