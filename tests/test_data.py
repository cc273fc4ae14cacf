"""Tests for data.py: IDX parsing and its errors, MD5 checks, downloads, real MNIST, folders, CIFAR pickles."""
import gzip
import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
import data
from conftest import MNIST
from data import SHIPPED_DIRS, DataError, load_dataset

MNIST_DIR = Path(MNIST)
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    """Point the download cache at tmp and make every mirror unreachable, so no test touches ~ or the network;
    the repository's own MNIST is out of sight too (test_the_shipped_mnist_is_read_first puts it back)."""
    monkeypatch.setenv("DIT_DATA_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data, "SHIPPED_DIRS", {})
    monkeypatch.setattr(data, "MIRRORS", {k: [(tmp_path / "no-mirror").as_uri() + "/"] for k in data.MIRRORS})


def assert_data_error(call, *needles):
    """call() must raise a one-line DataError containing every needle (file names, md5s, hints)."""
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert str(needle) in message, (needle, message)
    return message

# ---------------------------------------------------------------- IDX files written by the tests


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """Serialise a uint8 array as IDX: magic (0x08 = uint8, then ndim), big-endian dims, values."""
    magic = (0x0800 | array.ndim) if magic is None else magic
    return magic.to_bytes(4, "big") + np.array(array.shape, ">u4").tobytes() + array.astype(np.uint8).tobytes()


def write(path: Path, payload: bytes, gz: bool = True, mtime: int = 0) -> Path:
    path.write_bytes(gzip.compress(payload, mtime=mtime) if gz else payload)
    return path


def fake_split(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), rng.integers(0, 10, n).astype(np.uint8)


def write_fake_mnist(folder: Path, n_train=6, n_test=4, n_train_labels=None) -> dict:
    """The four MNIST file names holding small random data; returns {stem: (images or labels array)}."""
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, n, seed in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = fake_split(n, seed)
        if prefix == "train" and n_train_labels is not None:
            labels = fake_split(n_train_labels, 2)[1]
        arrays[f"{prefix}-images-idx3-ubyte"], arrays[f"{prefix}-labels-idx1-ubyte"] = images, labels
    for stem, array in arrays.items():
        write(folder / f"{stem}.gz", idx_bytes(array))
    return arrays


def register_md5s(monkeypatch, folder: Path, name: str = "mnist"):
    """Make the loader accept the test's own files: their real .gz and payload MD5s become the expected ones."""
    sums = {}
    for stem in data.IDX_MD5[name]:
        raw = (folder / f"{stem}.gz").read_bytes()
        sums[stem] = (hashlib.md5(raw).hexdigest(), hashlib.md5(gzip.decompress(raw)).hexdigest())
    monkeypatch.setitem(data.IDX_MD5, name, sums)


def test_read_idx_round_trip_gz_and_plain(tmp_path):
    images, labels = fake_split(3, 0)
    got = data.read_idx(write(tmp_path / "i.gz", idx_bytes(images)), data.IMAGES_MAGIC)
    assert got.shape == (3, 28, 28) and np.array_equal(got, images)
    got = data.read_idx(write(tmp_path / "l", idx_bytes(labels), gz=False), data.LABELS_MAGIC)
    assert np.array_equal(got, labels)


def test_read_idx_wrong_magic_names_file(tmp_path):
    path = write(tmp_path / "labels.gz", idx_bytes(fake_split(3, 0)[1]))
    assert_data_error(lambda: data.read_idx(path, data.IMAGES_MAGIC), path, "magic", "0x00000803")


def test_read_idx_truncated_payload_names_file(tmp_path):
    payload = idx_bytes(fake_split(3, 0)[0])
    path = write(tmp_path / "short.gz", payload[:-100])
    assert_data_error(lambda: data.read_idx(path, data.IMAGES_MAGIC), path, "truncated")
    path = write(tmp_path / "header-only", payload[:10], gz=False)  # not even a whole header
    assert_data_error(lambda: data.read_idx(path, data.IMAGES_MAGIC), path)


@pytest.mark.parametrize("damage", ["cut", "not-gzip"])
def test_read_idx_corrupt_gzip_names_file(tmp_path, damage):
    blob = gzip.compress(idx_bytes(fake_split(3, 0)[0]))
    path = tmp_path / "bad.gz"
    path.write_bytes(blob[: len(blob) // 2] if damage == "cut" else b"this is not gzip data at all")
    assert_data_error(lambda: data.read_idx(path, data.IMAGES_MAGIC), path, "gzip")

# ---------------------------------------------------------------- MNIST loader on fake files: MD5s, counts, downloads


def test_fake_mnist_loads_padded(tmp_path, monkeypatch):
    arrays = write_fake_mnist(tmp_path / "m")
    register_md5s(monkeypatch, tmp_path / "m")
    ds = load_dataset("mnist", str(tmp_path / "m"))
    assert ds.images.shape == (6, 1, 32, 32) and ds.images.dtype == torch.uint8 and ds.labels.dtype == torch.int64
    assert np.array_equal(ds.images[:, 0, 2:30, 2:30].numpy(), arrays["train-images-idx3-ubyte"])
    assert np.array_equal(ds.labels.numpy(), arrays["train-labels-idx1-ubyte"])
    assert ds.class_names == [str(d) for d in range(10)] and ds.num_classes == 10 and ds.channels == 1
    assert load_dataset("mnist", str(tmp_path / "m"), split="test").images.shape == (4, 1, 32, 32)


def test_md5_mismatch_names_file_and_both_sums(tmp_path):
    folder = tmp_path / "m"
    write_fake_mnist(folder)  # valid IDX files, but not the official ones
    path = folder / "train-images-idx3-ubyte.gz"
    assert_data_error(lambda: load_dataset("mnist", str(folder)), path, "md5",
                      data.IDX_MD5["mnist"]["train-images-idx3-ubyte"][0], hashlib.md5(path.read_bytes()).hexdigest(),
                      "re-download")


def test_recompressed_and_gunzipped_copies_pass_on_payload_md5(tmp_path, monkeypatch):
    """Debian re-gzips Fashion-MNIST: the .gz sum differs but the IDX payload is the official one."""
    folder = tmp_path / "m"
    arrays = write_fake_mnist(folder)
    register_md5s(monkeypatch, folder)
    for stem, array in arrays.items():
        write(folder / f"{stem}.gz", idx_bytes(array), mtime=123456)  # other gzip header -> other .gz md5
    assert len(load_dataset("mnist", str(folder)).images) == 6
    for stem, array in arrays.items():
        (folder / f"{stem}.gz").unlink()
        write(folder / stem, idx_bytes(array), gz=False)
    assert len(load_dataset("mnist", str(folder), split="test").images) == 4
    write(folder / "t10k-images-idx3-ubyte", idx_bytes(arrays["t10k-images-idx3-ubyte"][::-1]), gz=False)
    assert_data_error(lambda: load_dataset("mnist", str(folder), split="test"), "t10k-images-idx3-ubyte", "md5")


def test_image_label_count_mismatch_names_both_files(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    write_fake_mnist(folder, n_train=6, n_train_labels=5)
    register_md5s(monkeypatch, folder)
    assert_data_error(lambda: load_dataset("mnist", str(folder)), "train-images-idx3-ubyte.gz",
                      "train-labels-idx1-ubyte.gz", "6 images", "5 labels")


def test_download_into_cache_then_offline(tmp_path, monkeypatch):
    mirror = tmp_path / "mirror"
    arrays = write_fake_mnist(mirror)
    register_md5s(monkeypatch, mirror)
    monkeypatch.setitem(data.MIRRORS, "mnist", [(tmp_path / "dead").as_uri() + "/", mirror.as_uri() + "/"])
    ds = load_dataset("mnist")  # first mirror fails, second serves the files
    assert np.array_equal(ds.images[:, 0, 2:30, 2:30].numpy(), arrays["train-images-idx3-ubyte"])
    cache = tmp_path / "cache" / "mnist"
    assert sorted(p.name for p in cache.iterdir()) == ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]
    monkeypatch.setitem(data.MIRRORS, "mnist", [(tmp_path / "dead").as_uri() + "/"])
    assert len(load_dataset("mnist", download=False).images) == 6  # served from the cache, no network
    assert_data_error(lambda: load_dataset("mnist", split="test", download=False), "download is off", "--data-dir")


def test_download_failure_and_bad_mirror_bytes(tmp_path, monkeypatch):
    assert_data_error(lambda: load_dataset("mnist"), "could not download", "--data-dir")
    write_fake_mnist(tmp_path / "mirror")  # reachable, but md5 is not the official one
    monkeypatch.setitem(data.MIRRORS, "mnist", [(tmp_path / "mirror").as_uri() + "/"])
    assert_data_error(lambda: load_dataset("mnist"), "md5", "--data-dir")
    assert not any((tmp_path / "cache" / "mnist").iterdir())  # the bad bytes were not kept


def test_bad_arguments(tmp_path):
    message = assert_data_error(lambda: load_dataset("imagenet"), "imagenet")
    assert all(name in message for name in data.DATASETS)
    assert_data_error(lambda: load_dataset("mnist", str(tmp_path / "nope")), tmp_path / "nope", "does not exist")
    assert_data_error(lambda: load_dataset("mnist", str(tmp_path), split="val"), "val")
    assert_data_error(lambda: load_dataset("mnist", str(tmp_path), channels=2), "channels")
    assert_data_error(lambda: load_dataset("mnist", str(tmp_path)), "train-images-idx3-ubyte", "--data-dir")
    assert_data_error(lambda: load_dataset("folder"), "--data-dir")

# ---------------------------------------------------------------- real MNIST (conftest.MNIST)


def test_the_shipped_mnist_is_read_first_offline_and_checked(monkeypatch):
    """No --data-dir, no cache, no network: the repository's mnist/ folder, MD5-checked like any other."""
    monkeypatch.setattr(data, "SHIPPED_DIRS", SHIPPED_DIRS)
    assert SHIPPED_DIRS["mnist"] == Path(data.__file__).resolve().parent / "mnist"
    test = load_dataset("mnist", split="test", download=False)
    assert test.images.shape == (10000, 1, 32, 32) and torch.equal(test.labels, mnist_test_labels())
    sums = dict(line.split()[::-1] for line in (SHIPPED_DIRS["mnist"] / "MD5SUMS").read_text().splitlines())
    assert {k[:-3]: v for k, v in sums.items()} == {k: gz for k, (gz, _) in data.IDX_MD5["mnist"].items()}


def mnist_test_labels():
    return torch.from_numpy(np.frombuffer(gzip.decompress((MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()),
                                          np.uint8, offset=8).astype(np.int64))


@pytest.fixture(scope="module")
def mnist_train():
    return load_dataset("mnist", str(MNIST_DIR))


def raw_digits(stem: str) -> np.ndarray:
    """The 28x28 digits read straight from the gz, independently of data.py."""
    return np.frombuffer(gzip.decompress((MNIST_DIR / f"{stem}.gz").read_bytes()), np.uint8, offset=16)


def test_real_mnist_train(mnist_train):
    ds = mnist_train
    assert ds.images.shape == (60000, 1, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (60000,) and ds.labels.dtype == torch.int64
    counts = torch.bincount(ds.labels, minlength=10)
    assert len(counts) == 10 and counts.sum() == 60000 and ((counts >= 5000) & (counts <= 7000)).all()
    assert ds.images.min() == 0 and ds.images.max() == 255
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert ds.images[:, :, border].eq(0).all()
    assert np.array_equal(ds.images[:, 0, 2:30, 2:30].numpy().ravel(), raw_digits("train-images-idx3-ubyte"))


def test_real_mnist_test_split_channels_and_sizes():
    ds = load_dataset("mnist", str(MNIST_DIR), split="test", channels=3)
    assert ds.images.shape == (10000, 3, 32, 32) and ds.channels == 3
    assert ds.images[:, 0].equal(ds.images[:, 1]) and ds.images[:, 1].equal(ds.images[:, 2])
    assert np.array_equal(ds.images[:, 0, 2:30, 2:30].numpy().ravel(), raw_digits("t10k-images-idx3-ubyte"))
    assert load_dataset("mnist", str(MNIST_DIR), split="test", image_size=16).images.shape == (10000, 1, 16, 16)
    big = load_dataset("mnist", str(MNIST_DIR), split="test", image_size=36).images
    assert big.shape == (10000, 1, 36, 36) and big[:, :, :4].eq(0).all()


def test_model_range_round_trip(mnist_train):
    images = mnist_train.images[:512]
    x = data.to_model_range(images)
    assert x.dtype == torch.float32 and x.min() == -1 and x.max() == 1
    assert data.to_uint8(x).equal(images)                                 # the way back
    assert data.to_uint8(torch.tensor([-3.0, 0.0, 7.0])).tolist() == [0, 128, 255]  # clamped, rounded

# ---------------------------------------------------------------- Fashion-MNIST from the Debian package


@pytest.mark.skipif(not FASHION_DIR.is_dir(), reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_from_system_folder():
    ds = load_dataset("fashion-mnist")  # found in /usr/share/datasets; the cache stays empty
    assert ds.images.shape == (60000, 1, 32, 32) and torch.bincount(ds.labels).tolist() == [6000] * 10
    assert ds.class_names[0] == "T-shirt/top" and ds.class_names[9] == "Ankle boot"
    assert load_dataset("fashion-mnist", str(FASHION_DIR), split="test").images.shape == (10000, 1, 32, 32)

# ---------------------------------------------------------------- image folders


def save(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array.astype(np.uint8)).save(path)


def test_folder_colour_gray_and_center_crop(tmp_path):
    wide = np.zeros((20, 100, 3), np.uint8)
    wide[:, 30:70] = (0, 200, 0)  # 100x20 -> 160x32 keeps source columns 40..60: all green
    save(tmp_path / "cat" / "wide.png", wide)
    save(tmp_path / "cat" / "red.png", np.full((40, 30, 3), (255, 0, 0)))
    save(tmp_path / "dog" / "gray.png", np.full((50, 20), 77))
    (tmp_path / "dog" / "notes.txt").write_text("not an image")
    ds = load_dataset("folder", str(tmp_path))
    assert ds.class_names == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 1]  # sorted by file name in a class
    assert ds.images.shape == (3, 3, 32, 32) and ds.channels == 3
    assert ds.images[1].eq(torch.tensor([0, 200, 0]).view(3, 1, 1)).all()
    assert ds.images[2].eq(77).all()
    gray = load_dataset("folder", str(tmp_path), channels=1, image_size=24)
    assert gray.images.shape == (3, 1, 24, 24)
    assert gray.images[1].eq(Image.new("RGB", (1, 1), (0, 200, 0)).convert("L").getpixel((0, 0))).all()


def test_folder_of_gray_images_defaults_to_one_channel(tmp_path):
    save(tmp_path / "a" / "x.png", np.full((10, 10), 5))
    save(tmp_path / "b" / "y.jpg", np.stack([np.full((9, 12), 200)] * 3, -1))  # RGB file, gray pixels
    ds = load_dataset("folder", str(tmp_path))
    assert ds.images.shape == (2, 1, 32, 32) and ds.images[0].eq(5).all()


def test_folder_splits_and_errors(tmp_path):
    save(tmp_path / "flat" / "a" / "x.png", np.zeros((8, 8)))
    assert_data_error(lambda: load_dataset("folder", str(tmp_path / "flat"), split="test"), "test")
    for split in ("train", "test"):
        save(tmp_path / "split" / split / "a" / f"{split}.png", np.zeros((8, 8)))
    assert len(load_dataset("folder", str(tmp_path / "split"), split="test").images) == 1
    (tmp_path / "empty" / "a").mkdir(parents=True)
    assert_data_error(lambda: load_dataset("folder", str(tmp_path / "empty")),
                      f"no images under {tmp_path / 'empty'}", "<class>/<image>")
    (tmp_path / "flat" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
    assert_data_error(lambda: load_dataset("folder", str(tmp_path / "flat")), tmp_path / "flat" / "a" / "broken.png")

# ---------------------------------------------------------------- CIFAR-10 from fake pickled batches


def write_fake_cifar(folder: Path) -> dict:
    """batches.meta, data_batch_1..5 (2 images each) and test_batch (3), pickled like the real ones."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": ["airplane", "automobile", "bird"], "num_vis": 3072}, f, protocol=2)
    batches = {}
    for i, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        n = 3 if name == "test_batch" else 2
        batches[name] = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": rng.integers(0, 3, n).tolist(), b"batch_label": name.encode()}
        with open(folder / name, "wb") as f:  # protocol 2 as in the real files, 5 for the numpy 2 path
            pickle.dump(batches[name], f, protocol=2 if i % 2 else 5)
    return batches


def test_cifar_batches_folder_and_parent(tmp_path):
    batches = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    for data_dir in (tmp_path / "cifar-10-batches-py", tmp_path):
        ds = load_dataset("cifar10", str(data_dir))
        assert ds.images.shape == (10, 3, 32, 32) and ds.class_names == ["airplane", "automobile", "bird"]
        assert np.array_equal(ds.images[:2].numpy().reshape(2, 3072), batches["data_batch_1"][b"data"])
        assert ds.labels.tolist() == sum((batches[f"data_batch_{i}"][b"labels"] for i in range(1, 6)), [])
    test = load_dataset("cifar10", str(tmp_path), split="test", channels=1)
    assert test.images.shape == (3, 1, 32, 32)
    rgb = batches["test_batch"][b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    assert np.array_equal(test.images[0, 0].numpy(), np.asarray(Image.fromarray(rgb).convert("L")))  # ITU-R 601
    assert load_dataset("cifar10", str(tmp_path), split="test", image_size=16).images.shape == (3, 3, 16, 16)


def test_cifar_from_tar_gz_with_md5(tmp_path, monkeypatch):
    write_fake_cifar(tmp_path / "src" / "cifar-10-batches-py")
    archive = tmp_path / "dl" / data.CIFAR_ARCHIVE
    archive.parent.mkdir()
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    assert_data_error(lambda: load_dataset("cifar10", str(archive.parent)), archive, "md5", data.CIFAR_MD5)
    monkeypatch.setattr(data, "CIFAR_MD5", hashlib.md5(archive.read_bytes()).hexdigest())
    assert load_dataset("cifar10", str(archive.parent)).images.shape == (10, 3, 32, 32)
    assert sorted(p.name for p in archive.parent.iterdir()) == [data.CIFAR_ARCHIVE]  # nothing extracted


class Exploit:
    """Pickles to a call of os.system, the reason CIFAR batches go through the restricted unpickler."""
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"data": Exploit(marker), "labels": []})
    with pytest.raises(pickle.UnpicklingError, match="system"):
        data.RestrictedUnpickler(io.BytesIO(evil)).load()
    write_fake_cifar(tmp_path / "c")
    (tmp_path / "c" / "test_batch").write_bytes(evil)
    assert_data_error(lambda: load_dataset("cifar10", str(tmp_path / "c"), split="test"),
                      tmp_path / "c" / "test_batch", "system", "not allowed")
    assert not marker.exists()
    (tmp_path / "c" / "test_batch").write_bytes(pickle.dumps([1, 2, 3]))  # allowed types, wrong shape
    assert_data_error(lambda: load_dataset("cifar10", str(tmp_path / "c"), split="test"), "test_batch")


def test_number_words_only_for_digit_classes():
    digits, fashion = [str(i) for i in range(10)], data.CLASS_NAMES["fashion-mnist"]
    assert sample.parse_labels("7 seven 3, three", digits) == [7, 7, 3, 3]
    assert sample.parse_labels("trouser Bag 1", fashion) == [1, 8, 1]
    with pytest.raises(data.UserError, match="unknown label 'one'"):
        sample.parse_labels("one", fashion)                  # not "Trouser": the words are digits' names
