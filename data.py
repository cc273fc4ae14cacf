"""Every dataset the project trains on, loaded whole into memory as one uint8 tensor (N, C, H, W), and the
conversions between its uint8 pixels and the model's [-1, 1]."""
import gzip
import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from support import DiskFull, UserError, atomic_write

DATASETS = ("mnist", "fashion-mnist", "cifar10", "folder")


class DataError(UserError):
    """A dataset file is missing, corrupt or mismatched; str(e) is one line naming the file and the fix."""


@dataclass
class Dataset:
    """Images, labels and class names of one split; small enough (MNIST: 60 MB) to keep whole in memory."""
    images: torch.Tensor    # (N, C, H, W) uint8, C = 1 or 3, H = W = image_size
    labels: torch.Tensor    # (N,) int64
    class_names: list[str]  # class_names[label] names the class

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.images.shape[1]


#################################################################################
#                      Where files live and how to check them                   #
#################################################################################

# Expected MD5s per IDX file as (of the .gz, of the decompressed IDX). The .gz sums are the official ones
# (those published with MNIST's files; Fashion-MNIST: the zalandoresearch/fashion-mnist README). The IDX sums
# were computed from those verified files; they accept re-compressed copies (Debian's dataset-fashion-mnist
# re-gzips its files, so only the payload matches) and already-gunzipped files. A module dict so tests can
# register their own small files.
IDX_MD5 = {
    "mnist": {
        "train-images-idx3-ubyte": ("f68b3c2dcbeaaa9fbdd348bbdeb94873", "6bbc9ace898e44ae57da46a324031adb"),
        "train-labels-idx1-ubyte": ("d53e105ee54ea40749a09fcbcd1e9432", "a25bea736e30d166cdddb491f175f624"),
        "t10k-images-idx3-ubyte": ("9fb629c4189551a2d022fa330f9573f3", "2646ac647ad5339dbf082846283269ea"),
        "t10k-labels-idx1-ubyte": ("ec29112dd5afa0611ce80d1b7f02629c", "27ae3e4e09519cfbb04c329615203637"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte": ("8d4fb7e6c68d591d4c3dfef9ec88bf0d", "f4a8712d7a061bf5bd6d2ca38dc4d50a"),
        "train-labels-idx1-ubyte": ("25c81989df183df01b3e8a0aad5dffbe", "9018921c3c673c538a1fc5bad174d6f9"),
        "t10k-images-idx3-ubyte": ("bef4ecab320f06d8554ea6380940ec79", "8181f5470baa50b63fa0f6fddb340f0a"),
        "t10k-labels-idx1-ubyte": ("bb300cfdad3c16e7a12a480ee83cd310", "15d484375f8d13e6eb1aabb0c3f46965"),
    },
}
CIFAR_ARCHIVE, CIFAR_MD5 = "cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a"
MIRRORS = {  # tried in order; yann.lecun.com often refuses scripted downloads, so it is not listed
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/",
              "https://storage.googleapis.com/cvdf-datasets/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
}
SYSTEM_DIRS = {"fashion-mnist": "/usr/share/datasets/fashion-mnist"}  # Debian package dataset-fashion-mnist
SHIPPED_DIRS = {"mnist": Path(__file__).resolve().parent / "mnist"}   # the official files, in the repository
CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                      "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"],
}


def cache_dir(name: str) -> Path:
    """Per-dataset download cache: $DIT_DATA_CACHE/<name>, default ~/.cache/dit-mnist/<name>."""
    return Path(os.environ.get("DIT_DATA_CACHE") or Path.home() / ".cache" / "dit-mnist") / name


def download(name: str, filename: str, folder: Path, md5: str) -> Path:
    """Fetch filename from the first mirror that serves the right bytes; written atomically so no half file
    stays."""
    target, last_error = folder / filename, "no mirror"

    def fetch(url):
        def write(f):
            with urllib.request.urlopen(url, timeout=30) as response:
                digest = hashlib.md5()
                while chunk := response.read(1 << 20):
                    digest.update(chunk)
                    f.write(chunk)
            if digest.hexdigest() != md5:      # raised inside the write: the temp file is dropped
                raise OSError(f"md5 {digest.hexdigest()} != expected {md5}")
        return write
    for mirror in MIRRORS[name]:
        try:
            atomic_write(target, fetch(mirror + filename))
            return target
        except DiskFull:
            raise
        except Exception as e:  # any mirror failure (HTTP, DNS, timeout, bad bytes): try the next one
            last_error = f"{mirror + filename}: {e}"
    wanted = "the extracted cifar-10-batches-py" if name == "cifar10" else "the four IDX .gz files"
    raise DataError(f"could not download {name} file {filename} ({last_error}); pass --data-dir with "
                    f"a folder of {wanted}")


def md5_mismatch(path: Path, expected: str, actual: str) -> DataError:
    """The one error for a file that is not the official one."""
    return DataError(f"{path}: md5 {actual} does not match expected {expected}; the file is corrupt or not "
                     f"the official one: delete it and re-download (or pass --data-dir with good files)")

#################################################################################
#                       IDX files (MNIST, Fashion-MNIST)                        #
#################################################################################

IMAGES_MAGIC, LABELS_MAGIC = 0x00000803, 0x00000801  # 0x08 = uint8 elements, last byte = number of dimensions


def parse_idx(payload: bytes, magic: int, path: Path) -> np.ndarray:
    """IDX = big-endian magic, one uint32 per dimension, then uint8 values in C order."""
    ndim = magic & 0xFF
    if len(payload) < 4 + 4 * ndim or int.from_bytes(payload[:4], "big") != magic:
        found = payload[:4].hex() if len(payload) >= 4 else "too short"
        raise DataError(f"{path}: not an IDX file with magic {magic:#010x} (found {found}); "
                        f"wrong file (images vs labels?) or corrupt: re-download it")
    dims = tuple(int(d) for d in np.frombuffer(payload, ">u4", count=ndim, offset=4))
    body = len(payload) - 4 - 4 * ndim
    if body != int(np.prod(dims)):
        raise DataError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes but the file holds {body}; "
                        f"the file is truncated or corrupt: delete it and re-download")
    return np.frombuffer(payload, np.uint8, offset=4 + 4 * ndim).reshape(dims)


def read_idx(path: Path, magic: int, md5s: tuple[str, str] | None = None) -> np.ndarray:
    """Read one IDX file (.gz or plain); with md5s = (gz_md5, idx_md5) first check it is the official file."""
    path, gzipped = Path(path), Path(path).suffix == ".gz"
    try:
        raw = path.read_bytes()
        payload = gzip.decompress(raw) if gzipped else raw
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:  # a broken gzip is a DataError, not a traceback
        raise DataError(f"{path}: corrupt or truncated gzip ({e}); delete it and re-download") from None
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror}); check the path and permissions") from None
    if md5s is not None:
        gz_md5, idx_md5 = md5s
        file_md5 = hashlib.md5(raw).hexdigest()
        # The official .gz sum suffices; else the payload must match (a re-compressed or gunzipped copy).
        if not (gzipped and file_md5 == gz_md5) and hashlib.md5(payload).hexdigest() != idx_md5:
            raise md5_mismatch(path, gz_md5 if gzipped else idx_md5, file_md5)
    return parse_idx(payload, magic, path)


def find_idx_file(name: str, stem: str, data_dir: Path | None, allow_download: bool) -> Path:
    """data_dir if given (no network); else the repository's or the system's copy, else the cache, downloading
    into it if allowed."""
    if data_dir:
        folders = [data_dir]
    else:
        folders = [Path(d[name]) for d in (SHIPPED_DIRS, SYSTEM_DIRS) if name in d]
        folders.append(cache_dir(name))
    for folder in folders:
        for candidate in (folder / (stem + ".gz"), folder / stem):
            if candidate.is_file():
                return candidate
    if data_dir:
        raise DataError(f"{data_dir}: no {stem}.gz (or {stem}); pass --data-dir with a folder holding the "
                        f"four {name} IDX files (train/t10k images/labels)")
    if not allow_download:
        raise DataError(f"{name} file {stem}.gz is not in {cache_dir(name)} and download is off; "
                        f"pass --data-dir with a folder holding the four IDX files")
    return download(name, stem + ".gz", cache_dir(name), IDX_MD5[name][stem][0])


def load_idx_dataset(name: str, data_dir: Path | None, split: str,
                     allow_download: bool) -> tuple[np.ndarray, ...]:
    """(N, 28, 28) images and (N,) labels of one split, both checked against their MD5s."""
    prefix = "train" if split == "train" else "t10k"
    found = {}
    for kind, magic in (("images-idx3-ubyte", IMAGES_MAGIC), ("labels-idx1-ubyte", LABELS_MAGIC)):
        stem = f"{prefix}-{kind}"
        path = find_idx_file(name, stem, data_dir, allow_download)
        found[kind] = (path, read_idx(path, magic, IDX_MD5[name][stem]))
    (image_path, images), (label_path, labels) = found.values()
    if len(images) != len(labels):
        raise DataError(f"{image_path} has {len(images)} images but {label_path} has {len(labels)} labels; "
                        f"the files come from different sets: re-download both")
    if labels.size and labels.max() >= len(CLASS_NAMES[name]):
        raise DataError(f"{label_path}: label {labels.max()} out of range for {name}; re-download it")
    return images, labels

#################################################################################
#                          CIFAR-10 (python pickles)                            #
#################################################################################

# The batches are pickles, and unpickling can call any importable function (os.system included). Only the few
# globals numpy uses to rebuild an array are allowed; anything else means the file is not a CIFAR batch.
SAFE_GLOBALS = {
    # _codecs.encode: bytes in protocol-2 pickles
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
    # numpy 1 / 2 names
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    # protocol 5 arrays
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, lists, dicts and strings, and nothing else."""
    def find_class(self, module, name):
        if (module, name) not in SAFE_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed")
        return super().find_class(module, name)


def unpickle(data: bytes, where: str) -> dict:
    """One CIFAR batch as a dict with str keys; latin1 is how numpy reads arrays pickled by Python 2."""
    try:
        batch = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
        if not isinstance(batch, dict):
            raise pickle.UnpicklingError(f"holds a {type(batch).__name__}, not a dict")
    except Exception as e:  # refused global, truncated or garbage pickle: all mean a bad file
        raise DataError(f"{where}: not a CIFAR-10 python batch ({e}); delete it and re-download") from None
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def load_cifar10(data_dir: Path | None, split: str,
                 allow_download: bool) -> tuple[np.ndarray, np.ndarray, list]:
    """(N, 3, 32, 32) images, labels, class names from an extracted batch folder or straight from the
    tar.gz."""
    names = ["batches.meta"] + ([f"data_batch_{i}" for i in range(1, 6)] if split == "train"
                                else ["test_batch"])
    folder = data_dir or cache_dir("cifar10")
    batch_dirs = [folder, folder / "cifar-10-batches-py"]
    batch_dir = next((d for d in batch_dirs if (d / "batches.meta").is_file()), None)
    if batch_dir is not None:
        files = {}
        for n in names:
            if not (batch_dir / n).is_file():
                raise DataError(f"{batch_dir / n} is missing; re-extract {CIFAR_ARCHIVE} or re-download it")
            files[n] = ((batch_dir / n).read_bytes(), str(batch_dir / n))
    else:
        archive = folder / CIFAR_ARCHIVE
        if not archive.is_file():
            if data_dir or not allow_download:
                raise DataError(f"{folder}: neither cifar-10-batches-py/ nor {CIFAR_ARCHIVE}; pass "
                                f"--data-dir with the extracted cifar-10-batches-py folder or the folder "
                                f"holding the tar.gz")
            archive = download("cifar10", CIFAR_ARCHIVE, folder, CIFAR_MD5)
        actual = hashlib.md5(archive.read_bytes()).hexdigest()
        if actual != CIFAR_MD5:
            raise md5_mismatch(archive, CIFAR_MD5, actual)
        try:  # read the members in place: nothing is extracted into the user's folder
            with tarfile.open(archive, "r:gz") as tar:
                files = {Path(m.name).name: (tar.extractfile(m).read(), f"{archive}:{m.name}")
                         for m in tar.getmembers() if m.isfile() and Path(m.name).name in names}
        except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
            raise DataError(f"{archive}: corrupt archive ({e}); delete it and re-download") from None
        if missing := [n for n in names if n not in files]:
            raise DataError(f"{archive} lacks {', '.join(missing)}; delete it and re-download")
    class_names = [str(c) for c in unpickle(*files["batches.meta"]).get("label_names", [])]
    images, labels = [], []
    for n in names[1:]:
        batch = unpickle(*files[n])
        data, batch_labels = np.asarray(batch.get("data")), np.asarray(batch.get("labels", []), np.int64)
        if (data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32
                or len(data) != len(batch_labels)):
            raise DataError(f"{files[n][1]}: expected uint8 data (N, 3072) with N labels; re-download it")
        # Each row holds the R plane, then G, then B, each 32x32 row-major.
        images.append(data.reshape(-1, 3, 32, 32))
        labels.append(batch_labels)
    labels = np.concatenate(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= len(class_names)):
        raise DataError(f"{folder}: labels out of range of batches.meta's {len(class_names)} names; "
                        f"re-download")
    return np.concatenate(images), labels, class_names

#################################################################################
#                     Image folders: DIR/<class>/<image>                        #
#################################################################################

IMAGE_SUFFIXES = {suffix for suffix, _ in Image.registered_extensions().items()}


def label_spelling(name):
    """How a class name is typed in --labels: lower case, spaces as _ ('Ankle boot' -> 'ankle_boot')."""
    return name.lower().replace(" ", "_")


def eight_bit(image: Image.Image) -> Image.Image:
    """16-bit greyscale (PNG's I;16 modes, or I) scaled to 8 bits; convert("RGB") would clip it at 255,
    almost white."""
    if not (image.mode.startswith("I;16") or image.mode == "I"):
        return image
    values = np.asarray(image).astype(np.float64) / 257                # 65535 -> 255
    return Image.fromarray(values.round().clip(0, 255).astype(np.uint8), "L")


def fit_square(image: Image.Image, size: int) -> Image.Image:
    """Resize the shorter side to size, then crop the centre: keeps the aspect ratio, drops the edges."""
    w, h = image.size
    scale = size / min(w, h)
    w, h = max(size, round(w * scale)), max(size, round(h * scale))
    image = image.resize((w, h), Image.Resampling.BILINEAR)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


def load_folder(data_dir: Path, split: str, size: int) -> tuple[np.ndarray, np.ndarray, list]:
    """(N, 3, size, size) images, labels and class names; train/ and test/ subfolders, if present, are the
    splits."""
    if (data_dir / "train").is_dir() and (data_dir / "test").is_dir():
        data_dir = data_dir / split
    elif split == "test":
        raise DataError(f"{data_dir} has no train/ and test/ subfolders, so no test split; use split 'train'")
    class_names = sorted(d.name for d in data_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
    typed = {}
    for name in class_names:             # --labels must reach every class, each by one name
        other = typed.setdefault(label_spelling(name), name)
        if other != name:
            raise DataError(f"class folders {other!r} and {name!r} in {data_dir} are the same label when "
                            f"typed ({label_spelling(name)!r}); rename one of them")
    images, labels, empty = [], [], []
    for label, class_name in enumerate(class_names):
        before = len(images)
        for path in sorted((data_dir / class_name).rglob("*")):
            if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
                continue  # README, .DS_Store and such are not images
            try:
                with Image.open(path) as image:  # exif_transpose: phone photos store their rotation in EXIF
                    image = eight_bit(ImageOps.exif_transpose(image)).convert("RGB")
            except Exception as e:
                raise DataError(f"{path}: unreadable image ({e}); delete or replace it") from None
            images.append(np.asarray(fit_square(image, size)).transpose(2, 0, 1))  # (3, size, size)
            labels.append(label)
        if len(images) == before:
            empty.append(data_dir / class_name)
    if not images:
        raise DataError(f"no images under {data_dir}: expected {data_dir}/<class>/<image>")
    if empty:                                  # a class without images would still get a label and a grid row
        raise DataError(f"class folder {empty[0]} holds no images; add some or remove the folder")
    return np.stack(images), np.array(labels, np.int64), class_names

#################################################################################
#                       Shared resizing and channel mapping                     #
#################################################################################


def to_gray(images: np.ndarray) -> np.ndarray:
    """(N, 3, H, W) -> (N, 1, H, W) by ITU-R 601 luma, Y = 0.299 R + 0.587 G + 0.114 B."""
    r, g, b = (images[:, i:i + 1].astype(np.uint32) for i in range(3))
    # PIL's convert("L") fixed-point weights (0.299, 0.587, 0.114) * 2^16, rounded: integer math,
    # same bytes as PIL
    return ((r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16).astype(np.uint8)


def pad_or_resize(images: np.ndarray, size: int, pad: bool) -> np.ndarray:
    """(N, C, h, w) -> (N, C, size, size): zero-pad (pixels kept exact) when pad and growing, else PIL
    bilinear."""
    n, c, h, w = images.shape
    if (h, w) == (size, size):
        return images
    if pad and size >= h and size >= w:
        out = np.zeros((n, c, size, size), np.uint8)
        top, left = (size - h) // 2, (size - w) // 2  # 28 -> 32: 2 px each side, as in the DiT MNIST setup
        out[:, :, top:top + h, left:left + w] = images
        return out
    out = np.empty((n, size, size, c), np.uint8)
    for i, image in enumerate(images.transpose(0, 2, 3, 1)):  # PIL wants (H, W) for gray, (H, W, 3) for RGB
        resized = Image.fromarray(image[..., 0] if c == 1 else image).resize((size, size),
                                                                             Image.Resampling.BILINEAR)
        out[i] = np.asarray(resized).reshape(size, size, c)
    return out.transpose(0, 3, 1, 2).copy()

#################################################################################
#                                 Public entry                                  #
#################################################################################


def load_dataset(name: str, data_dir: str | None = None, split: str = "train", image_size: int = 32,
                 channels: int | None = None, download: bool = True) -> Dataset:
    """Load one split of a dataset as uint8 (N, C, image_size, image_size); channels None keeps the native
    count."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    if split not in ("train", "test"):
        raise DataError(f"unknown split {split!r}; use 'train' or 'test'")
    if channels not in (None, 1, 3) or image_size < 1:
        raise DataError(f"channels must be 1 or 3 (got {channels}) and image_size >= 1 (got {image_size})")
    root = Path(data_dir).expanduser() if data_dir else None
    if root is not None and not root.is_dir():
        what = "is a file, not a folder" if root.exists() else "does not exist"
        raise DataError(f"data dir {root} {what}; pass --data-dir with an existing folder")
    if name in ("mnist", "fashion-mnist"):
        images, labels = load_idx_dataset(name, root, split, download)
        images, class_names = pad_or_resize(images[:, None], image_size, pad=True), CLASS_NAMES[name]
    elif name == "cifar10":
        images, labels, class_names = load_cifar10(root, split, download)
        # Natural photos are resized, not padded: zero borders would be a new style to learn.
        images = pad_or_resize(images, image_size, pad=False)
    else:
        if root is None:
            raise DataError("the folder dataset needs --data-dir DIR with one subfolder of images per class")
        images, labels, class_names = load_folder(root, split, image_size)
        # Default: 3 channels if any image is colour. Judged from the pixels, not the file mode: gray scans
        # saved as RGB JPEGs stay 1-channel.
        is_colour = bool((images[:, 0] != images[:, 1]).any() or (images[:, 1] != images[:, 2]).any())
        channels = channels or (3 if is_colour else 1)
    if channels == 1 and images.shape[1] == 3:
        images = to_gray(images)
    elif channels == 3 and images.shape[1] == 1:
        images = images.repeat(3, axis=1)  # gray to RGB: the 3-channel model path runs on MNIST too
    return Dataset(torch.from_numpy(np.ascontiguousarray(images)), torch.from_numpy(labels.astype(np.int64)),
                   list(class_names))


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1], the range the diffusion forward process assumes for x_0."""
    return images_uint8.float() / 127.5 - 1


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """Float images in [-1, 1] -> uint8 [0, 255], same shape (to_model_range's inverse); samples overshoot
    a little, so clamp first."""
    return ((images.detach().float() + 1) * 127.5).clamp(0, 255).round().byte()
