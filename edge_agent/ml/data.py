"""Datasets, partitions and per-device data for the PoS-BFL testbed (numpy only).

Validators run without torch, so this module must never import it (only
:func:`download_mnist` imports torchvision, lazily, inside the function).

* Loading: MNIST / Fashion-MNIST IDX files (gzipped or not) from a data directory,
  with the Debian ``dataset-fashion-mnist`` package as an offline fallback.
* Partitions: FedAvg-style label shards (McMahan et al. 2017, "Communication-Efficient
  Learning of Deep Networks from Decentralized Data": sort by label, cut into
  ``2 * n_devices`` shards, two shards per device -> pathological non-IID), IID, and
  Dirichlet label skew (Hsu, Qi and Brown 2019, "Measuring the Effects of Non-Identical
  Data Distribution for Federated Visual Classification": each device's label
  proportions ~ Dir(alpha); small alpha -> few labels per device, large alpha -> IID).
* Test splits: every device holds its own disjoint IID slice of the test set,
  independent of its training partition; validators evaluate models on theirs.

Everything is a pure function of the spec and the seed, so every device that computes
the full partition from the same spec obtains the same slices.
"""

from __future__ import annotations

import fcntl
import functools
import gzip
import hashlib
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "DATASETS",
    "DEBIAN_FASHION_MNIST_DIR",
    "DataMissingError",
    "Dataset",
    "DeviceData",
    "PARTITIONS",
    "device_data",
    "download_mnist",
    "load_dataset",
    "normalize",
    "partition_train",
    "test_split",
]

DATASETS = ("mnist", "fashion-mnist")
PARTITIONS = ("shards", "iid", "dirichlet")
DEBIAN_FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")

# Sub-directory names used by torchvision (<root>/<Name>/raw/<files>).
_TORCHVISION_NAMES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
# Per-dataset normalisation constants (mean, std) of the training pixels in [0, 1].
_NORM = {"mnist": (0.1307, 0.3081), "fashion-mnist": (0.2860, 0.3530)}

_FILES = {
    "train_x": "train-images-idx3-ubyte",
    "train_y": "train-labels-idx1-ubyte",
    "test_x": "t10k-images-idx3-ubyte",
    "test_y": "t10k-labels-idx1-ubyte",
}
_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension
_N_CLASSES = 10

# Distinct stream tags so the train partition and test split use independent randomness.
_TAG_TRAIN = 0x7472
_TAG_TEST = 0x7465


class DataMissingError(Exception):
    """A dataset is absent or unreadable; the message is one line and says how to fix it."""


@dataclass(frozen=True)
class Dataset:
    """A whole dataset as read from IDX files (arrays are read-only, shared via cache)."""

    name: str
    train_x: np.ndarray  # uint8 [N, 28, 28]
    train_y: np.ndarray  # uint8 [N]
    test_x: np.ndarray  # uint8 [M, 28, 28]
    test_y: np.ndarray  # uint8 [M]


@dataclass(frozen=True)
class DeviceData:
    """One device's normalised training partition and its own test split."""

    train_x: np.ndarray  # float32 [n, 1, 28, 28]
    train_y: np.ndarray  # int64 [n]
    test_x: np.ndarray  # float32 [m, 1, 28, 28]
    test_y: np.ndarray  # int64 [m]


# --------------------------------------------------------------------------- loading


def _check_name(name: str) -> str:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; expected one of {', '.join(DATASETS)}")
    return name


def _fix_hint(name: str) -> str:
    if name == "fashion-mnist":
        return (
            "run `sudo apt-get install dataset-fashion-mnist` or pass --data-dir DIR containing "
            "train-images-idx3-ubyte(.gz), train-labels-idx1-ubyte(.gz), "
            "t10k-images-idx3-ubyte(.gz), t10k-labels-idx1-ubyte(.gz)"
        )
    return (
        "run `bfl data fetch mnist --data-dir DIR` (needs internet) or pass --data-dir DIR "
        "containing train-images-idx3-ubyte(.gz) and the other three MNIST IDX files"
    )


def _find_file(directory: Path, base: str) -> Path | None:
    for candidate in (directory / base, directory / (base + ".gz")):
        if candidate.is_file():
            return candidate
    return None


def _candidate_dirs(name: str, data_dir: str | Path | None) -> list[Path]:
    dirs: list[Path] = []
    if data_dir is not None:
        root = Path(data_dir).expanduser()
        dirs += [root, root / name, root / _TORCHVISION_NAMES[name] / "raw"]
    if name == "fashion-mnist":
        dirs.append(DEBIAN_FASHION_MNIST_DIR)
    return dirs


def resolve_files(name: str, data_dir: str | Path | None) -> dict[str, Path]:
    """First candidate directory holding all four IDX files, else DataMissingError."""
    for directory in _candidate_dirs(name, data_dir):
        found = {key: _find_file(directory, base) for key, base in _FILES.items()}
        if all(p is not None for p in found.values()):
            return {key: p.resolve() for key, p in found.items()}  # type: ignore[union-attr]
    places = [str(d) for d in _candidate_dirs(name, data_dir)] or ["(no --data-dir given)"]
    raise DataMissingError(f"{name} not found in {', '.join(places)}: {_fix_hint(name)}")


def _read_bytes(path: Path) -> bytes:
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":  # gzip magic, whatever the file is called
        return gzip.decompress(raw)
    return raw


def _parse_idx(raw: bytes, images: bool) -> np.ndarray:
    """Parse an IDX ubyte file; ValueError (one line) if it is not a well-formed one."""
    ndim = 3 if images else 1
    header_len = 4 + 4 * ndim
    if len(raw) < header_len:
        raise ValueError(f"truncated header ({len(raw)} bytes)")
    header = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    magic = int(header[0])
    expected = _IDX_IMAGES_MAGIC if images else _IDX_LABELS_MAGIC
    if magic != expected:
        raise ValueError(f"bad magic number 0x{magic:08x}, expected 0x{expected:08x}")
    dims = tuple(int(d) for d in header[1:])
    if images and dims[1:] != (28, 28):
        raise ValueError(f"images are {dims[1]}x{dims[2]}, expected 28x28")
    count = int(np.prod(dims, dtype=np.int64))
    if dims[0] == 0 or len(raw) - header_len != count:
        raise ValueError(f"payload is {len(raw) - header_len} bytes, header says {count}")
    arr = np.frombuffer(raw, dtype=np.uint8, offset=header_len).reshape(dims).copy()
    if not images and arr.max() >= _N_CLASSES:
        raise ValueError(f"label {int(arr.max())} out of range 0..{_N_CLASSES - 1}")
    arr.setflags(write=False)
    return arr


def _load_idx(path: Path, images: bool, name: str) -> np.ndarray:
    try:
        return _parse_idx(_read_bytes(path), images)
    except (OSError, EOFError, zlib.error, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise DataMissingError(
            f"{name} file {path} is corrupt or unreadable ({reason}): {_fix_hint(name)}"
        ) from None


# Co-located agents (compute.SharedCache): parsed arrays are written once as .npy files and
# memory-mapped, so a host's agents share one copy in the page cache instead of each
# decompressing and parsing the whole dataset at once (100 agents: about 10 GB at join).
_ARRAY_CACHE: Path | None = None


def set_array_cache(directory: str | Path | None) -> None:
    global _ARRAY_CACHE
    _ARRAY_CACHE = Path(directory) if directory else None


def _load_array(path: Path, images: bool, name: str, size: int, mtime: int) -> np.ndarray:
    if _ARRAY_CACHE is None:
        return _load_idx(path, images, name)
    digest = hashlib.sha256(f"{path}|{size}|{mtime}".encode()).hexdigest()[:16]
    cached = _ARRAY_CACHE / f"{name}-{path.name}-{digest}.npy"
    try:
        return np.load(cached, mmap_mode="r")
    except (OSError, ValueError):
        pass
    _ARRAY_CACHE.mkdir(parents=True, exist_ok=True)
    # one agent parses while the others wait for its file: 20 agents joining at once each
    # decompressed and parsed the whole set (about 100 MB each, the testbed's peak)
    with open(cached.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return np.load(cached, mmap_mode="r")
        except (OSError, ValueError):
            pass
        arr = _load_idx(path, images, name)
        tmp = cached.with_suffix(f".{os.getpid()}.part")
        with open(tmp, "wb") as f:
            np.save(f, arr)
        os.replace(tmp, cached)
    del arr
    return np.load(cached, mmap_mode="r")  # the page cache's copy, shared with the others


@functools.lru_cache(maxsize=8)
def _load_cached(name: str, files: tuple[tuple[str, str, int, int], ...]) -> Dataset:
    # `files` holds (key, resolved path, size, mtime_ns): a changed file is re-read.
    arrays = {key: _load_array(Path(p), key.endswith("_x"), name, size, mtime) for key, p, size, mtime in files}
    for split in ("train", "test"):
        nx, ny = len(arrays[f"{split}_x"]), len(arrays[f"{split}_y"])
        if nx != ny:
            raise DataMissingError(
                f"{name} {split} split has {nx} images but {ny} labels in "
                f"{Path(files[0][1]).parent}: {_fix_hint(name)}"
            )
    return Dataset(name=name, **arrays)


def release_datasets() -> None:
    """Drop the parsed datasets this process caches (an agent keeps only its own shard:
    about 55 MB less per agent for Fashion-MNIST)."""
    _load_cached.cache_clear()


def load_dataset(name: str, data_dir: str | Path | None = None) -> Dataset:
    """Load ``name`` ("mnist" or "fashion-mnist") from IDX files.

    Search order: ``data_dir/<files>``, ``data_dir/<name>/<files>``,
    ``data_dir/<MNIST|FashionMNIST>/raw/<files>`` (torchvision layout) and, for
    Fashion-MNIST, the Debian package directory /usr/share/datasets/fashion-mnist.
    Parsed arrays are cached in-process (read-only). Raises DataMissingError.
    """
    _check_name(name)
    paths = resolve_files(name, data_dir)
    key = []
    for k in _FILES:
        st = os.stat(paths[k])
        key.append((k, str(paths[k]), st.st_size, st.st_mtime_ns))
    return _load_cached(name, tuple(key))


def download_mnist(data_dir: str | Path) -> Path:
    """Download MNIST with torchvision into ``data_dir/MNIST/raw`` (needs internet).

    torchvision is imported here only, so the rest of this module stays torch-free.
    Returns the directory holding the IDX files; raises DataMissingError on failure.
    """
    root = Path(data_dir).expanduser()
    try:
        from torchvision.datasets import MNIST  # lazy: pulls in torch

        root.mkdir(parents=True, exist_ok=True)
        MNIST(root=str(root), train=True, download=True)
        MNIST(root=str(root), train=False, download=True)
    except ImportError:
        raise DataMissingError(
            "downloading MNIST needs torchvision: run `pip install 'posbfl-testbed[worker]'` "
            f"or copy the four MNIST IDX files into {root}"
        ) from None
    except Exception as exc:  # network errors, checksum failures, permissions, ...
        reason = (str(exc).splitlines() or [type(exc).__name__])[0]
        raise DataMissingError(
            f"MNIST download into {root} failed ({reason}): check internet access or copy the "
            "four MNIST IDX files (train-images-idx3-ubyte.gz, ...) into that directory"
        ) from None
    load_dataset("mnist", root)  # validate what was written
    return root / _TORCHVISION_NAMES["mnist"] / "raw"


# ------------------------------------------------------------------------ partitions


def _rng(seed: int, tag: int) -> np.random.Generator:
    if int(seed) < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    return np.random.default_rng([int(seed), tag])


def partition_train(
    labels: np.ndarray,
    n_devices: int,
    scheme: str,
    samples_per_device: int,
    seed: int,
    alpha: float = 0.5,
) -> list[np.ndarray]:
    """Split training indices into ``n_devices`` disjoint int64 index arrays.

    ``"shards"`` (FedAvg, McMahan et al. 2017): take ``n_devices * samples_per_device``
    samples (a seeded random subset when fewer than the whole set), sort them by label
    (stable), cut them into ``2 * n_devices`` contiguous shards and give every device two
    shards chosen by a seeded permutation: non-IID, mostly two labels per device. With an
    odd ``samples_per_device`` shards alternate between sizes ``ceil`` and ``floor`` of
    half, and each device gets one of each so that all devices hold the same count.

    ``"iid"``: a seeded permutation cut into consecutive slices.

    ``"dirichlet"`` (Hsu et al. 2019): see :func:`_dirichlet_partition`; ``alpha`` (> 0)
    is its concentration and is ignored by the other schemes.
    """
    labels = np.asarray(labels)
    n_devices, per = int(n_devices), int(samples_per_device)
    if scheme not in PARTITIONS:
        raise ValueError(f"unknown partition scheme {scheme!r}; expected one of {PARTITIONS}")
    if n_devices < 1 or per < 1:
        raise ValueError(f"need n_devices >= 1 and samples_per_device >= 1, got {n_devices}, {per}")
    total = n_devices * per
    if total > len(labels):
        raise ValueError(
            f"{n_devices} devices x {per} samples = {total} exceeds the {len(labels)} "
            "training samples; lower samples_per_device"
        )
    if scheme == "shards" and per < 2:
        raise ValueError("the shards partition needs samples_per_device >= 2 (two shards each)")
    rng = _rng(seed, _TAG_TRAIN)
    if scheme == "dirichlet":
        return _dirichlet_partition(labels, n_devices, per, float(alpha), rng)
    chosen = rng.permutation(len(labels))[:total].astype(np.int64)
    if scheme == "iid":
        return [chosen[d * per : (d + 1) * per].copy() for d in range(n_devices)]

    ordered = chosen[np.argsort(labels[chosen], kind="stable")]
    big, small = per - per // 2, per // 2
    sizes = np.tile(np.array([big, small], dtype=np.int64), n_devices)
    bounds = np.concatenate(([0], np.cumsum(sizes)))
    shards = [ordered[bounds[i] : bounds[i + 1]] for i in range(2 * n_devices)]
    if big == small:
        pairs = rng.permutation(2 * n_devices).reshape(n_devices, 2)
    else:
        pairs = np.stack(
            [2 * rng.permutation(n_devices), 2 * rng.permutation(n_devices) + 1], axis=1
        )
    return [np.concatenate([shards[a], shards[b]]) for a, b in pairs]


def _dirichlet_partition(
    labels: np.ndarray, n_devices: int, per: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Dirichlet label-skew partition (Hsu et al. 2019), exactly ``per`` samples per device.

    Each class's indices are shuffled once; devices are then served in index order.
    Device d draws label proportions p_d ~ Dir(alpha * 1_K) and per-class counts
    ~ Multinomial(per, p_d), and takes those counts from the front of each class's
    unused indices (sampling without replacement, so devices are disjoint).

    Exhaustion: when a class has fewer unused samples than requested, the device takes
    what is left and redistributes the shortfall over the classes that still have
    samples, with a new multinomial draw proportional to p_d restricted to those classes
    (or to their remaining counts if p_d puts no mass on any of them); this repeats until
    the device holds ``per`` samples, which always terminates because every draw lands
    on an available class and ``n_devices * per <= len(labels)``. Later devices are thus
    somewhat less skewed when the data set is nearly used up.
    """
    if not (math.isfinite(alpha) and alpha > 0):
        raise ValueError(f"dirichlet alpha must be a finite number > 0, got {alpha}")
    labels = labels.astype(np.int64)
    n_classes = int(labels.max()) + 1 if len(labels) else 0
    pools = [rng.permutation(np.flatnonzero(labels == c)).astype(np.int64) for c in range(n_classes)]
    used = np.zeros(n_classes, dtype=np.int64)
    sizes = np.array([len(p) for p in pools], dtype=np.int64)
    parts: list[np.ndarray] = []
    for _ in range(n_devices):
        p = rng.dirichlet(np.full(n_classes, alpha))
        p = np.where(np.isfinite(p), p, 0.0)
        take = np.zeros(n_classes, dtype=np.int64)
        need, weights = per, p
        while need > 0:
            left = sizes - used - take
            avail = left > 0
            w = np.where(avail, weights, 0.0)
            if w.sum() <= 0:
                w = left.clip(min=0).astype(np.float64)
            draw = rng.multinomial(need, w / w.sum())
            got = np.minimum(draw, left.clip(min=0))
            take += got
            need -= int(got.sum())
        chunks = [pools[c][used[c] : used[c] + take[c]] for c in range(n_classes)]
        used += take
        parts.append(rng.permutation(np.concatenate(chunks)).astype(np.int64))
    return parts


def test_split(n_test: int, n_devices: int, per_device: int, seed: int) -> list[np.ndarray]:
    """Disjoint IID slices of the test set, one per device (a seeded permutation).

    Each device's test split is independent of its training partition; validators
    vote on the accuracy they measure on it.
    """
    n_test, n_devices, per_device = int(n_test), int(n_devices), int(per_device)
    if n_devices < 1 or per_device < 1:
        raise ValueError(f"need n_devices >= 1 and per_device >= 1, got {n_devices}, {per_device}")
    if per_device > n_test // n_devices:
        raise ValueError(
            f"test_per_device {per_device} exceeds {n_test} test images / {n_devices} devices "
            f"= {n_test // n_devices}"
        )
    perm = _rng(seed, _TAG_TEST).permutation(n_test).astype(np.int64)
    return [perm[d * per_device : (d + 1) * per_device].copy() for d in range(n_devices)]


test_split.__test__ = False  # type: ignore[attr-defined]  # not a pytest test


def normalize(x_uint8: np.ndarray, dataset: str) -> np.ndarray:
    """uint8 [n, 28, 28] pixels -> float32 [n, 1, 28, 28] standardised per dataset."""
    mean, std = _NORM[_check_name(dataset)]
    x = np.asarray(x_uint8)
    if x.dtype != np.uint8:
        raise ValueError(f"expected uint8 pixels, got {x.dtype}")
    out = x.reshape(-1, 1, 28, 28).astype(np.float32) / np.float32(255.0)
    out -= np.float32(mean)
    out /= np.float32(std)
    return out


def device_data(spec: dict, device_index: int, data_dir: str | Path | None = None) -> DeviceData:
    """The training partition and test split of device ``device_index`` under ``spec``.

    ``spec`` = {"dataset", "partition": "shards"|"iid"|"dirichlet", "samples_per_device",
    "test_per_device", "seed", "n_devices", "alpha_milli"}; ``alpha_milli`` is the
    Dirichlet concentration times 1000 (integer, default 500 = alpha 0.5, used by the
    "dirichlet" partition only); missing sizes default to an even split of
    the whole train / test set. Every device computes the full partition from the same
    spec, so all agree on who holds which samples.
    """
    name = _check_name(str(spec["dataset"]))
    n_devices = int(spec["n_devices"])
    if not 0 <= int(device_index) < n_devices:
        raise ValueError(f"device_index {device_index} out of range 0..{n_devices - 1}")
    ds = load_dataset(name, data_dir)
    seed = int(spec.get("seed", 0))
    per = spec.get("samples_per_device") or len(ds.train_y) // n_devices
    per_test = spec.get("test_per_device") or len(ds.test_y) // n_devices
    alpha = int(spec.get("alpha_milli", 500)) / 1000
    train_idx = partition_train(
        ds.train_y, n_devices, str(spec.get("partition", "shards")), int(per), seed, alpha=alpha
    )[device_index]
    test_idx = test_split(len(ds.test_y), n_devices, int(per_test), seed)[device_index]
    return DeviceData(
        train_x=normalize(ds.train_x[train_idx], name),
        train_y=ds.train_y[train_idx].astype(np.int64),
        test_x=normalize(ds.test_x[test_idx], name),
        test_y=ds.test_y[test_idx].astype(np.int64),
    )
