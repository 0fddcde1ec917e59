"""Dataset checks: find what would make a training run crash or silently mislabel, before it starts.

``check_dataset(root)`` works on the three layouts of :mod:`.layout` and returns a
:class:`DatasetReport` whose ``problems`` are of two sorts:

- unreadable files (``FILE_KINDS``; ``report.unreadable``), for every file with an image
  extension (the files DALI's reader would feed its decoder): ``zero-byte``, ``unreadable`` (the
  OS refuses to read it), ``missing-file`` (listed in a file list, absent), ``not-an-image`` (its
  first bytes are no image format: text, HTML, ...), ``unsupported`` (an image format DALI does not
  decode, e.g. GIF), ``truncated`` (the file stops before its end marker and does not decode),
  ``undecodable`` (corrupt otherwise). DALI stops the whole pipeline at the first such file
  ("Critical error in pipeline", measured on truncated JPEGs and PNGs, even a JPEG missing only
  its final 2 bytes) -- hours into a run. A PNG, grey or CMYK JPEG named ``.JPEG`` is *valid*:
  DALI decodes by content, as ImageNet needs.
- structural faults (``report.structural``): a missing ``train/`` or ``val/`` split (or
  ``train.txt``/``val.txt``), a split without class folders, a class folder with no image file
  (``empty-class``), ``val/`` classes absent from ``train/`` (no class index), malformed file
  lists, shard arrays that are truncated or disagree with their manifest, shard labels out of
  range.

How deep each file is looked at (``depth``: ``header``, ``quick`` -- the default and the
training pre-flight -- or ``full``) is described in :mod:`.image_check`.

Cost, measured on this project's 2-core machine (local virtual disk, 20,000 distinct ImageNet-size
JPEGs with their data evicted from the page cache, 62,000 with it warm): ``quick`` reads 5,600
files/s on one thread and 15,000-18,000 files/s on 8-32 threads when the data is cold, about
70,000 files/s on one thread when it is in the page cache (threads then only add lock contention);
through the cache (only a ``stat`` per file) about 90,000 files/s. ``full`` decodes about 340
512x512 JPEGs/s per core. So the first ``quick`` pass over ImageNet's 1.33 M files costs about 1.5
minutes here (more on a network file system, where the threads hide the latency), later passes
about 15 s; a ``full`` pass about an hour per core.

Cache (``cache_dir``): the keys of the files that passed -- a 64-bit hash of (path relative to the
root, size, mtime, ctime) -- are kept in ``cache_dir/data-check/<root hash>-<depth>.npy`` (8 bytes
per file, 10 MB for ImageNet); a later check only ``stat``s a file whose key is there. A file that
is changed, replaced or touched gets a new key and is checked again; files with problems are never
cached, so every report lists them all. Only datasets of at least ``cache_min_files`` files are
cached (below that a check takes well under a second).
"""
from __future__ import annotations

import hashlib
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .image_check import DEPTHS, Problem, check_image
from .layout import LayoutError, class_names, list_filelist, scan_class_dir
from .shard import MANIFEST, ShardError, is_shard_dir, read_manifest

SPLITS = ("train", "val")
CACHE_MIN_FILES = 10_000


@dataclass
class DatasetReport:
    root: Path
    layout: str                                   # imagefolder, filelist or shard
    problems: list[Problem] = field(default_factory=list)
    images: dict[str, int] = field(default_factory=dict)   # files/images per split (all checked)
    classes: int = 0
    ignored: int = 0                              # files without an image extension
    depth: str = "quick"
    checked: int = 0                              # image files examined in this check
    cached: int = 0                               # image files known good from the cache
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def unreadable(self) -> list[Problem]:
        """The unreadable files (``FILE_KINDS``), in listing order."""
        return [p for p in self.problems if p.is_file]

    @property
    def structural(self) -> list[Problem]:
        return [p for p in self.problems if not p.is_file]

    def summary(self) -> str:
        splits = ", ".join(f"{s} {n}" for s, n in self.images.items()) or "no images"
        if self.ok:
            verdict = "OK"
        else:
            files, other = len(self.unreadable), len(self.structural)
            parts = ([f"{files} unreadable file(s)"] if files else []) + \
                    ([f"{other} structural"] if other else [])
            verdict = f"{len(self.problems)} problem(s) ({', '.join(parts)})"
        ignored = f", {self.ignored} non-image file(s) ignored" if self.ignored else ""
        how = ""
        if self.layout != "shard":
            cached = f", {self.cached} known good from the cache" if self.cached else ""
            how = f"; {self.depth} check of {self.checked} file(s){cached} in {self.seconds:.2f} s"
        return (f"{verdict}: {self.root} ({self.layout}: {splits}; {self.classes} classes"
                f"{ignored}{how})")

    def format(self) -> str:
        """One line per problem, then the summary line."""
        return "\n".join([p.format() for p in self.problems] + [self.summary()])


def default_cache_dir() -> Path | None:
    """``$BINARYDUO_CACHE_DIR`` (empty or ``off``: no cache), else ``$XDG_CACHE_HOME/binaryduo``,
    else ``~/.cache/binaryduo``."""
    explicit = os.environ.get("BINARYDUO_CACHE_DIR")
    if explicit is not None:
        return None if explicit.strip().lower() in ("", "off", "none") else Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "binaryduo"


def check_dataset(root: str | Path, *, depth: str = "quick", workers: int | None = None,
                  cache_dir: str | Path | None = None,
                  cache_min_files: int = CACHE_MIN_FILES) -> DatasetReport:
    """Checks ``root`` (see the module docstring). ``workers``: threads reading files (default
    4 per CPU, at most 32). ``cache_dir``: where known-good files are remembered (None: no
    cache). Raises ``NotADirectoryError`` when ``root`` is not a directory."""
    if depth not in DEPTHS:
        raise ValueError(f"depth {depth!r}: expected one of {DEPTHS}")
    root = Path(root)
    if not root.is_dir():
        raise NotADirectoryError(f"{root}: not a directory")
    workers = workers or min(32, 4 * (os.cpu_count() or 1))
    started = time.monotonic()
    if is_shard_dir(root):
        report = _check_shard(root)
    else:
        filelist = (root / "train.txt").is_file() or (root / "val.txt").is_file()
        report = DatasetReport(root, "filelist" if filelist else "imagefolder", depth=depth)
        files = (_list_filelist(root, report) if filelist else _list_imagefolder(root, report))
        cache = None
        if cache_dir is not None and len(files) >= cache_min_files:
            cache = _Cache(Path(cache_dir), root, depth)
        problems, report.cached = _check_files(files, root, depth, workers, cache)
        report.checked = len(files) - report.cached
        report.problems.extend(problems)
    report.seconds = time.monotonic() - started
    return report


# ------------------------------------------------------------------------- many files, cache
def _file_key(path: str, root: str) -> int | None:
    """64-bit cache key of a file's relative path, size, mtime and ctime (None: no stat)."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    text = f"{os.path.relpath(path, root)}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ctime_ns}"
    digest = hashlib.blake2b(text.encode("utf-8", "surrogateescape"), digest_size=8).digest()
    return int.from_bytes(digest, "little")


class _Cache:
    """The sorted uint64 keys of the files of one root that passed one depth of check."""

    def __init__(self, directory: Path, root: Path, depth: str):
        name = hashlib.blake2b(str(root.resolve()).encode("utf-8", "surrogateescape"),
                               digest_size=8).hexdigest()
        self.path = directory / "data-check" / f"{name}-{depth}.npy"
        try:
            self.keys = np.load(self.path)
            if self.keys.dtype != np.uint64 or self.keys.ndim != 1:
                raise ValueError("not a key array")
        except (OSError, ValueError, EOFError):  # none yet, or damaged: check everything
            self.keys = np.zeros(0, np.uint64)

    def known(self, keys: np.ndarray) -> np.ndarray:
        return np.isin(keys, self.keys, assume_unique=False)

    def save(self, keys: np.ndarray) -> None:
        keys = np.unique(keys.astype(np.uint64))
        if np.array_equal(keys, self.keys):
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            partial = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            with open(partial, "wb") as handle:
                np.save(handle, keys)
            os.replace(partial, self.path)
        except OSError as error:  # the check itself is complete; only the next one is slower
            print(f"binaryduo: warning: cannot write the data-check cache {self.path}: "
                  f"{error.strerror or error}", file=sys.stderr)


def _map(function, items: list, workers: int) -> list:
    """``[function(item) ...]`` in order, on ``workers`` threads, in chunks (one future per
    item would cost more than a quick check of it)."""
    if workers <= 1 or len(items) < 64:
        return [function(item) for item in items]
    size = max(16, min(512, len(items) // (4 * workers)))
    chunks = [items[start:start + size] for start in range(0, len(items), size)]
    with ThreadPoolExecutor(workers) as pool:
        done = pool.map(lambda chunk: [function(item) for item in chunk], chunks)
        return [result for chunk in done for result in chunk]


def _check_files(files: list[str], root: Path, depth: str, workers: int,
                 cache: _Cache | None) -> tuple[list[Problem], int]:
    """The problems of ``files`` (in order) and how many files the cache vouched for."""
    check = lambda f: check_image(f, depth=depth)  # noqa: E731
    if cache is None:
        return [p for p in _map(check, files, workers) if p is not None], 0
    base = str(root)
    raw = _map(lambda f: _file_key(f, base), files, workers)
    stat_ok = np.array([k is not None for k in raw], dtype=bool)
    keys = np.array([k or 0 for k in raw], dtype=np.uint64)
    known = cache.known(keys) & stat_ok
    todo = np.flatnonzero(~known)
    results = _map(check, [files[i] for i in todo], workers)
    passed = known.copy()
    passed[todo] = [r is None for r in results]
    cache.save(keys[passed & stat_ok])
    return [p for p in results if p is not None], int(known.sum())


# --------------------------------------------------------------------------------- layouts
def _list_imagefolder(root: Path, report: DatasetReport) -> list[str]:
    """Structural problems into ``report``; returns the image files to check."""
    train_classes: list[str] | None = None
    files: list[str] = []
    for split in SPLITS:
        split_dir = root / split
        if not split_dir.is_dir():
            report.problems.append(Problem("missing-split", str(split_dir),
                                           f"no {split}/ folder"))
            continue
        classes = class_names(split_dir)
        if not classes:
            report.problems.append(Problem("no-classes", str(split_dir), "no class folders"))
            continue
        if split == "train":
            train_classes = classes
            report.classes = len(classes)
        elif train_classes is not None:
            for name in sorted(set(classes) - set(train_classes)):
                report.problems.append(Problem(
                    "unknown-class", str(split_dir / name),
                    "class folder not in train/: it has no class index"))
        count = 0
        for name in classes:
            images, others = scan_class_dir(split_dir / name)
            report.ignored += others
            if not images:
                extra = f" ({others} other file(s))" if others else ""
                report.problems.append(Problem("empty-class", str(split_dir / name),
                                               f"no image files{extra}"))
            count += len(images)
            files.extend(images)
        report.images[split] = count
    if report.classes == 0 and (root / "val").is_dir():
        report.classes = len(class_names(root / "val"))
    return files


def _list_filelist(root: Path, report: DatasetReport) -> list[str]:
    files: dict[str, None] = {}   # ordered, each file once (a file may be in both lists)
    for split in SPLITS:
        if not (root / f"{split}.txt").is_file():
            report.problems.append(Problem("missing-split", str(root / f"{split}.txt"),
                                           f"no {split}.txt"))
            continue
        try:
            listing = list_filelist(root, split)
        except LayoutError as error:
            report.problems.append(Problem("bad-list", str(root / f"{split}.txt"), str(error)))
            continue
        report.classes = max(report.classes, len(listing.classes))
        report.images[split] = len(listing)
        for path in listing.files:
            if os.path.exists(path):
                files[path] = None
            else:
                report.problems.append(Problem("missing-file", path,
                                               f"listed in {split}.txt, does not exist"))
    return list(files)


def _npy_problem(path: Path, shape: tuple, dtype) -> str | None:
    """What is wrong with one ``.npy`` array file of a shard (read: its header only)."""
    try:
        with open(path, "rb") as handle:
            version = np.lib.format.read_magic(handle)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            found_shape, _, found_dtype = read_header(handle)
            offset, size = handle.tell(), os.fstat(handle.fileno()).st_size
    except FileNotFoundError:
        return "missing"
    except OSError as error:
        return f"unreadable ({error.strerror or error})"
    except (ValueError, EOFError) as error:
        return f"not a .npy array ({' '.join(str(error).split())})"
    if found_shape != shape or found_dtype != np.dtype(dtype):
        return (f"array is {found_dtype}{list(found_shape)}, manifest says "
                f"{np.dtype(dtype)}{list(shape)}")
    expected = offset + int(np.prod(found_shape, dtype=np.int64)) * found_dtype.itemsize
    if size < expected:
        return f"truncated: {size} bytes, its header promises {expected}"
    return None


def _check_shard(root: Path) -> DatasetReport:
    report = DatasetReport(root, "shard")
    try:
        manifest = read_manifest(root, verify=False)
    except ShardError as error:
        report.problems.append(Problem("shard", str(root / MANIFEST), str(error)))
        return report
    report.classes = len(manifest.classes)
    report.images = manifest.counts
    for split, info in manifest.splits.items():
        for name, shape, dtype in ((info.images, (info.count, *info.shape), np.uint8),
                                   (info.labels, (info.count,), np.int64)):
            problem = _npy_problem(root / name, shape, dtype)
            if problem is not None:
                report.problems.append(Problem("shard", str(root / name),
                                               f"{split} array: {problem}"))
    if report.problems:
        return report
    for split in SPLITS:
        if split not in manifest.splits:
            report.problems.append(Problem("missing-split", str(root / MANIFEST),
                                           f"manifest has no {split} split"))
            continue
        _, labels = manifest.load_split(split)
        bad = np.flatnonzero((labels < 0) | (labels >= len(manifest.classes)))
        if len(bad):
            report.problems.append(Problem(
                "shard", str(root / manifest.splits[split].labels),
                f"{len(bad)} label(s) outside 0..{len(manifest.classes) - 1} "
                f"(first at index {bad[0]}: {labels[bad[0]]})"))
    return report
