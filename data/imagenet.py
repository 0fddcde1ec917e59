"""ImageNet preparation: the flat ILSVRC2012 validation folder into class folders, and pre-resized
copies of an image tree for data-bound clusters.

Class indices
-------------
The pipeline's ImageFolder layout numbers classes by **sorted folder name**; with the 1000 wnid
folders of ILSVRC2012 (``n01440764`` ... ``n15075141``) that is the *standard* index every
PyTorch/timm/TF model uses (0 = n01440764 tench, 999 = n15075141 toilet tissue). The official
validation ground truth (``ILSVRC2012_validation_ground_truth.txt`` in the devkit) is different: one
1-based **ILSVRC2012_ID** per line (line k = ``ILSVRC2012_val_<k:08d>.JPEG``), and those IDs follow
the devkit's own synset order (``data/meta.mat``), *not* the sorted wnid order. So the IDs are
mapped to wnids first, and the class folders are named by wnid.

Supported ground-truth files (one label per line, line k for image k; ``--labels`` says which,
``auto`` tells wnids from integers and takes integers as ILSVRC2012_IDs):

=================  ===================================================  ==========================
``--labels``       lines                                                mapping needed (--synsets)
=================  ===================================================  ==========================
``ilsvrc2012-id``  1-based devkit IDs (the official file)               the devkit's ``meta.mat``,
                                                                        or a text file of the 1000
                                                                        wnids in ID order (line k =
                                                                        ID k)
``wnid``           wnids, e.g. ``n01751748`` (TF's                      none
                   ``imagenet_2012_validation_synset_labels.txt``)
``index``          0-based standard indices (sorted-wnid order)         the sorted wnid list: a
                                                                        text file of 1000 sorted
                                                                        wnids; default: timm's
                                                                        ``imagenet_synsets.txt``
                                                                        when timm is installed
=================  ===================================================  ==========================

Files are hard-linked (default; same file system) or copied (``copy=True``); the user's files are
never moved or modified. Output: ``OUT/<wnid>/ILSVRC2012_val_<k>.JPEG`` -- use it as
``$IMAGENET_DIR/val`` beside ``$IMAGENET_DIR/train/<wnid>/``.

Pre-resized copies
------------------
:func:`prepare_resized` writes a copy of an ImageFolder or file-list tree with every image whose
shorter side exceeds S re-encoded at shorter side S (Pillow, antialiased, JPEG quality 90 by
default; EXIF orientation applied, CMYK converted to RGB, grey kept grey). Smaller images, and
files Pillow cannot decode (left for ``binaryduo data check`` to report), are copied unchanged;
other files (``train.txt`` ...) are copied too. See ``benchmarks/preresize.py`` for the measured
decode speed-up and the README for the trade-off (random-resized-crop then sees at most S pixels).
"""
from __future__ import annotations

import errno
import importlib.util
import json
import os
import re
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .layout import is_image_name
from .prepare import DatasetExistsError, SourceMissingError, _write_atomically
from .shard import is_shard_dir

NUM_CLASSES = 1000
LABEL_KINDS = ("auto", "ilsvrc2012-id", "wnid", "index")
VAL_NAME = re.compile(r"ILSVRC2012_val_(\d{8})\.[A-Za-z]+")
WNID = re.compile(r"n\d{8}")
VAL_MARKER = ".binaryduo-imagenet-val.json"  # hidden: the layout ignores it
RESIZED_MARKER = ".binaryduo-resized.json"


class PrepareInputError(ValueError):
    """A ground-truth, synset or image file is not what it should be (nothing was written)."""


# ------------------------------------------------------------------------------------- synsets


def timm_synsets_file() -> Path | None:
    """timm's ``imagenet_synsets.txt`` (the 1000 wnids in standard order), located without
    importing timm; None when timm is not installed."""
    spec = importlib.util.find_spec("timm")
    if spec is None or not spec.submodule_search_locations:
        return None
    package = Path(list(spec.submodule_search_locations)[0])
    path = package / "data" / "_info" / "imagenet_synsets.txt"
    return path if path.is_file() else None


def _read_wnid_lines(path: Path) -> list[str]:
    try:
        lines = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise PrepareInputError(f"{path}: cannot read synsets ({error})") from None
    bad = [(i + 1, w) for i, w in enumerate(lines) if not WNID.fullmatch(w)]
    if bad:
        raise PrepareInputError(f"{path}:{bad[0][0]}: {bad[0][1]!r} is not a wnid (n + 8 digits)")
    if len(lines) != NUM_CLASSES or len(set(lines)) != NUM_CLASSES:
        raise PrepareInputError(f"{path}: {len(lines)} lines / {len(set(lines))} distinct wnids, "
                                f"expected the {NUM_CLASSES} ILSVRC2012 classes")
    return lines


def standard_synsets(path: str | Path | None = None) -> list[str]:
    """The 1000 wnids in standard index order (sorted): from ``path`` (a text file, which must be
    sorted), else from timm's file."""
    if path is None:
        path = timm_synsets_file()
        if path is None:
            raise PrepareInputError("no sorted wnid list: pass --synsets FILE (1000 wnids, one per "
                                    "line, sorted), or install timm (its imagenet_synsets.txt)")
    wnids = _read_wnid_lines(Path(path))
    if wnids != sorted(wnids):
        raise PrepareInputError(f"{path}: wnids are not in sorted (standard index) order")
    return wnids


def devkit_synsets(path: str | Path) -> list[str]:
    """The 1000 wnids in ILSVRC2012_ID order (element k-1 = ID k): from the devkit's
    ``data/meta.mat`` (its ``synsets`` struct: ILSVRC2012_ID, WNID, ...), or a text file of 1000
    wnids, line k = ID k."""
    path = Path(path)
    if path.suffix.lower() != ".mat":
        return _read_wnid_lines(path)
    from scipy.io import loadmat  # scipy comes with mlflow/scikit-learn

    try:
        synsets = loadmat(str(path), squeeze_me=True, struct_as_record=False)["synsets"]
        pairs = [(int(s.ILSVRC2012_ID), str(s.WNID)) for s in synsets]
    except FileNotFoundError:
        raise SourceMissingError(f"{path}: no such synsets file") from None
    except Exception as error:  # scipy raises many kinds on a file that is not a MAT file
        raise PrepareInputError(f"{path}: not an ILSVRC2012 devkit meta.mat ({error!r})") from None
    by_id = {i: w for i, w in pairs if 1 <= i <= NUM_CLASSES}
    wnids = [by_id.get(i) for i in range(1, NUM_CLASSES + 1)]
    if None in wnids or len(set(wnids)) != NUM_CLASSES or not all(map(WNID.fullmatch, wnids)):
        raise PrepareInputError(f"{path}: synsets do not give 1000 distinct wnids for "
                                f"ILSVRC2012_ID 1..1000")
    return wnids


# ------------------------------------------------------------------------------ validation set


@dataclass(frozen=True)
class ValPrepareResult:
    out: Path
    images: int
    classes: int
    ground_truth_lines: int
    created: bool
    seconds: float

    def format(self) -> str:
        verb = f"wrote ({self.seconds:.1f} s)" if self.created else "already complete, unchanged"
        note = ""
        if self.images < self.ground_truth_lines:
            note = (f"; the ground truth names {self.ground_truth_lines} images, "
                    f"{self.ground_truth_lines - self.images} of them are not in the source")
        return (f"imagenet-val: {self.images} images in {self.classes} class folders in "
                f"{self.out}: {verb}{note}")


def read_ground_truth(path: str | Path, labels: str = "auto",
                      synsets: str | Path | None = None) -> list[str]:
    """The wnid of every validation image, element k-1 for ``ILSVRC2012_val_<k>``."""
    if labels not in LABEL_KINDS:
        raise PrepareInputError(f"--labels {labels!r}: expected one of {', '.join(LABEL_KINDS)}")
    path = Path(path)
    try:
        lines = [line.strip() for line in path.read_text().splitlines()]
    except FileNotFoundError:
        raise SourceMissingError(f"{path}: no such ground-truth file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise PrepareInputError(f"{path}: cannot read ground truth ({error})") from None
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise PrepareInputError(f"{path}: empty ground-truth file")
    if labels == "auto":
        labels = "wnid" if WNID.fullmatch(lines[0]) else "ilsvrc2012-id"
    if labels == "wnid":
        for number, line in enumerate(lines, 1):
            if not WNID.fullmatch(line):
                raise PrepareInputError(f"{path}:{number}: {line!r} is not a wnid")
        return lines
    values = []
    for number, line in enumerate(lines, 1):
        try:
            values.append(int(line))
        except ValueError:
            raise PrepareInputError(f"{path}:{number}: {line!r} is not an integer "
                                    f"({labels} labels)") from None
    if labels == "ilsvrc2012-id":
        low, high = 1, NUM_CLASSES
        if synsets is None:
            raise PrepareInputError(
                "ILSVRC2012_IDs (the official ground truth) follow the devkit's synset order, "
                "not the sorted-wnid index: pass --synsets ILSVRC2012_devkit_t12/data/meta.mat "
                "(or --labels index / wnid for files in those forms)")
        order = devkit_synsets(synsets)
    else:
        low, high = 0, NUM_CLASSES - 1
        order = standard_synsets(synsets)
    for number, value in enumerate(values, 1):
        if not low <= value <= high:
            raise PrepareInputError(f"{path}:{number}: {labels} {value} outside {low}..{high}")
    return [order[v - low] for v in values]


def prepare_imagenet_val(flat_dir: str | Path, ground_truth: str | Path, out_dir: str | Path, *,
                         labels: str = "auto", synsets: str | Path | None = None,
                         copy: bool = False, force: bool = False) -> ValPrepareResult:
    """Links (or copies) every ``ILSVRC2012_val_<k>.*`` image of ``flat_dir`` to
    ``out_dir/<wnid>/`` by line k of ``ground_truth`` (see the module docstring). Atomic: the
    folder appears complete or not at all. Raises :class:`SourceMissingError`,
    :class:`PrepareInputError` or :class:`DatasetExistsError` before writing anything."""
    start = time.perf_counter()
    flat, out = Path(flat_dir), Path(out_dir)
    if not flat.is_dir():
        raise SourceMissingError(f"{flat}: not a directory (expected the flat ILSVRC2012 "
                                 "validation folder)")
    wnids = read_ground_truth(ground_truth, labels, synsets)
    placed: list[tuple[Path, str]] = []
    strangers = []
    for entry in sorted(os.scandir(flat), key=lambda e: e.name):
        if entry.name.startswith(".") or not entry.is_file() or not is_image_name(entry.name):
            continue
        match = VAL_NAME.fullmatch(entry.name)
        if match is None:
            strangers.append(entry.name)
            continue
        number = int(match.group(1))
        if not 1 <= number <= len(wnids):
            raise PrepareInputError(f"{entry.name}: image {number} has no line in {ground_truth} "
                                    f"({len(wnids)} lines)")
        placed.append((Path(entry.path), wnids[number - 1]))
    if strangers:
        raise PrepareInputError(f"{flat}: {len(strangers)} image file(s) not named "
                                f"ILSVRC2012_val_<8 digits>.<ext>, e.g. {strangers[0]}")
    if not placed:
        raise PrepareInputError(f"{flat}: no ILSVRC2012_val_*.JPEG images")
    classes = len({w for _, w in placed})
    record = {"kind": "imagenet-val", "images": len(placed), "classes": classes,
              "ground_truth": str(Path(ground_truth).resolve()),
              "ground_truth_lines": len(wnids), "source": str(flat.resolve()),
              "mode": "copy" if copy else "hardlink"}

    def result(created: bool) -> ValPrepareResult:
        return ValPrepareResult(out, len(placed), classes, len(wnids), created,
                                time.perf_counter() - start)

    if out.exists() and not force:
        if _marker_matches(out / VAL_MARKER, record, ("images", "classes", "ground_truth_lines")):
            return result(False)
        if not out.is_dir() or any(out.iterdir()):
            raise DatasetExistsError(f"{out} exists and is not this validation set; remove it, "
                                     "choose another directory, or pass --force to replace it")
    if not copy:
        _check_hard_links(flat, out)

    def write(tmp: Path) -> None:
        for wnid in sorted({w for _, w in placed}):
            (tmp / wnid).mkdir()
        for source, wnid in placed:
            target = tmp / wnid / source.name
            if copy:
                shutil.copy2(source, target)
            else:
                os.link(source, target)
        (tmp / VAL_MARKER).write_text(json.dumps(record, indent=2) + "\n")

    _write_atomically(out, write, replace=force)
    return result(True)


def _check_hard_links(source: Path, out: Path) -> None:
    parent = out.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if os.stat(source).st_dev != os.stat(parent).st_dev:
        raise PrepareInputError(f"{source} and {out} are on different file systems: hard links "
                                "are impossible; pass --copy to copy the images")


def _marker_matches(path: Path, record: dict, keys: tuple[str, ...]) -> bool:
    try:
        found = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return all(found.get(k) == record[k] for k in keys)


# --------------------------------------------------------------------------- pre-resized copies


@dataclass(frozen=True)
class ResizeResult:
    out: Path
    resized: int
    kept: int          # already small enough: copied unchanged
    undecodable: int   # Pillow could not decode them: copied unchanged (see `data check`)
    other: int         # non-image files copied
    bytes_in: int
    bytes_out: int
    created: bool
    seconds: float

    def format(self) -> str:
        if not self.created:
            return f"resized: {self.out}: already complete, unchanged"
        ratio = self.bytes_out / max(self.bytes_in, 1)
        return (f"resized: {self.resized} images re-encoded, {self.kept} already small enough, "
                f"{self.undecodable} undecodable (copied as they are), {self.other} other files; "
                f"{self.bytes_in / 1e6:.1f} MB -> {self.bytes_out / 1e6:.1f} MB ({ratio:.0%}) in "
                f"{self.out} ({self.seconds:.1f} s)")


def resize_image(source: Path, target: Path, shorter_side: int, quality: int) -> str:
    """Writes ``target``: ``resized``, ``kept`` (copied: small enough) or ``undecodable``
    (copied: Pillow fails on it)."""
    from PIL import Image, ImageOps

    try:
        with Image.open(source) as image:
            width, height = image.size
            if min(width, height) <= shorter_side:
                image.load()  # decodes completely, or raises on a truncated file
                action = "kept"
            else:
                scale = shorter_side / min(width, height)
                if image.format == "JPEG":  # DCT-domain pre-scaling to >= 2x the target
                    image.draft(image.mode, (round(width * scale * 2), round(height * scale * 2)))
                image.load()
                icc = image.info.get("icc_profile")
                image = ImageOps.exif_transpose(image)  # what a decoder that honours EXIF shows
                if image.mode not in ("RGB", "L"):
                    image = image.convert("RGB")        # CMYK, palette, alpha -> RGB
                    icc = None                          # the profile described the old mode
                scale = shorter_side / min(image.size)
                size = (max(1, round(image.size[0] * scale)), max(1, round(image.size[1] * scale)))
                resized = image.resize(size, Image.Resampling.LANCZOS)
                extra = {"icc_profile": icc} if icc else {}
                if source.suffix.lower() == ".png":
                    resized.save(target, format="PNG", **extra)
                else:
                    resized.save(target, format="JPEG", quality=quality, **extra)
                return "resized"
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError):
        action = "undecodable"
    shutil.copy2(source, target)
    return action


def prepare_resized(source_dir: str | Path, out_dir: str | Path, *, shorter_side: int,
                    quality: int = 90, workers: int | None = None,
                    force: bool = False) -> ResizeResult:
    """Copies the tree ``source_dir`` (ImageFolder or file-list layout) to ``out_dir`` with images
    re-encoded at ``shorter_side`` (see the module docstring). Atomic and idempotent."""
    start = time.perf_counter()
    source, out = Path(source_dir), Path(out_dir)
    if not source.is_dir():
        raise SourceMissingError(f"{source}: not a directory")
    if is_shard_dir(source):
        raise PrepareInputError(f"{source} is a numpy shard (already decoded small images): "
                                "nothing to resize")
    if not (source / "train").is_dir() and not (source / "val").is_dir() \
            and not (source / "train.txt").is_file() and not (source / "val.txt").is_file():
        raise PrepareInputError(f"{source}: no train/ val/ folders or train.txt/val.txt: not an "
                                "ImageFolder or file-list dataset")
    if shorter_side < 16:
        raise PrepareInputError(f"--shorter-side {shorter_side}: must be >= 16")
    if not 1 <= quality <= 100:
        raise PrepareInputError(f"--quality {quality}: must be in 1..100")
    try:
        if out.resolve().is_relative_to(source.resolve()):
            raise PrepareInputError(f"{out} lies inside {source}")
    except OSError:
        pass
    record = {"kind": "resized", "source": str(source.resolve()), "shorter_side": shorter_side,
              "quality": quality}
    if out.exists() and not force:
        if _marker_matches(out / RESIZED_MARKER, record, ("source", "shorter_side", "quality")):
            return ResizeResult(out, 0, 0, 0, 0, 0, 0, False, time.perf_counter() - start)
        if not out.is_dir() or any(out.iterdir()):
            raise DatasetExistsError(f"{out} exists and is not this resized copy; remove it, "
                                     "choose another directory, or pass --force to replace it")

    images, others = [], []
    for dirpath, dirnames, filenames in os.walk(source, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        relative = Path(dirpath).relative_to(source)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            (images if is_image_name(name) else others).append(relative / name)
    counts = {"resized": 0, "kept": 0, "undecodable": 0}
    sizes = {"in": 0, "out": 0}

    def write(tmp: Path) -> None:
        for relative in {p.parent for p in images + others}:
            (tmp / relative).mkdir(parents=True, exist_ok=True)
        for relative in others:
            shutil.copy2(source / relative, tmp / relative)
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            actions = pool.map(lambda r: resize_image(source / r, tmp / r, shorter_side, quality),
                               images)
            for action in actions:
                counts[action] += 1
        sizes["in"] = sum((source / r).stat().st_size for r in images)
        sizes["out"] = sum((tmp / r).stat().st_size for r in images)
        (tmp / RESIZED_MARKER).write_text(json.dumps({**record, **counts}, indent=2) + "\n")

    try:
        _write_atomically(out, write, replace=force)
    except OSError as error:
        if error.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise DatasetExistsError(f"{out} appeared while writing; not replaced") from None
        raise
    return ResizeResult(out, counts["resized"], counts["kept"], counts["undecodable"],
                        len(others), sizes["in"], sizes["out"], True, time.perf_counter() - start)
