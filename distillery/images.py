"""The image sets a run reads: listed, hashed and checked once, decoded by one function.

:class:`ImageSet` is an ordered list of image files with their sha256 (the identity every table, stamp and
feature store keys on). :func:`unlabeled_set` lists ``data.unlabeled`` once per process and run folder,
hashes every file, and checks that each one decodes; unreadable files (corrupt, empty, not an image, a
dangling link, a decompression bomb) are **skipped, counted and listed** with the reason instead of stopping
the run, and the result is recorded in ``teacher/images.parquet``. A decode verdict is cached there by the
file's sha256, so a rerun re-hashes the files but decodes none of them again.

Every stage decodes through :func:`load_rgb`, the runtime's own decoder (16-bit images keep their high byte,
CMYK/palette/alpha images are converted as the runtime does), so the teachers, the student and the runtime
see the same pixels.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from .rundir import IMAGE_EXTENSIONS, RunPaths, log, read_table, sha256_file, write_table

__all__ = ["ImageSet", "load_rgb", "list_images", "unlabeled_set", "eval_set", "check_image", "check_table_paths"]


def load_rgb(path: str | os.PathLike):
    """Decode an image file to an RGB PIL image exactly as the runtime does (ValueError when it cannot, or when it
    has more pixels than Pillow's ``Image.MAX_IMAGE_PIXELS``: every stage refuses the same oversized images, before
    decoding them, where Pillow itself only warns below twice that limit)."""
    from distillery.runtime.preprocess import load_image

    check_pixels(path)
    return load_image(os.fspath(path))


def check_pixels(path: str | os.PathLike) -> None:
    """ValueError naming the file when its header says it has more than ``Image.MAX_IMAGE_PIXELS`` pixels."""
    import warnings

    from PIL import Image

    limit = Image.MAX_IMAGE_PIXELS
    if not limit or not os.path.isfile(path):
        return  # no limit set, or a missing file: the decoder's own error says which
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
    except (OSError, Image.DecompressionBombError, ValueError):
        return  # not an image, or far too large: the decoder's own error says which
    if w * h > limit:
        raise ValueError(f"image {os.fspath(path)!r} has {w}x{h} = {w * h:,} pixels, more than the {limit:,}-pixel "
                         "limit (PIL.Image.MAX_IMAGE_PIXELS) every stage applies; downscale it or remove it from the "
                         "folder.")


def check_image(path: str | os.PathLike) -> str | None:
    """None when ``path`` decodes as an image, else the reason it does not (one line)."""
    try:
        load_rgb(path)
    except (ValueError, FileNotFoundError, OSError) as e:
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def list_images(folder: str | os.PathLike, extensions=IMAGE_EXTENSIONS) -> tuple[list[Path], list[tuple[str, str]]]:
    """Image files under ``folder`` (recursive, any case of the extension), sorted by relative path.

    Returns ``(files, skipped)``: ``skipped`` lists ``(path, reason)`` for entries that look like images but
    cannot be read as files (dangling links, links that loop). Hidden files are ignored.
    """
    folder = Path(folder)
    exts = {e.lower() for e in extensions}
    files, skipped = [], []
    for p in folder.rglob("*"):
        if p.name.startswith(".") or p.suffix.lower() not in exts:
            continue
        try:
            if p.is_file():
                files.append(p)
            elif p.is_symlink():
                skipped.append((str(p), "a link that points nowhere (dangling or looping)"))
        except OSError as e:  # e.g. a symlink loop
            skipped.append((str(p), f"cannot be read ({e.strerror or e})"))
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix()), sorted(skipped)


@dataclass
class ImageSet:
    """An ordered set of readable images: ``paths[i]`` has content hash ``sha256[i]``."""

    paths: list[Path]
    sha256: list[str]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, why) for files left out
    source: str = ""  # the folder they came from

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def str_paths(self) -> list[str]:
        return [str(p.resolve()) for p in self.paths]

    def index(self) -> dict[str, int]:
        """sha256 -> first row with that content."""
        out: dict[str, int] = {}
        for i, s in enumerate(self.sha256):
            out.setdefault(s, i)
        return out

    def subset(self, rows: list[int]) -> "ImageSet":
        return ImageSet([self.paths[i] for i in rows], [self.sha256[i] for i in rows], [], self.source)


def _scan(folder: str, extensions, known: dict[str, str | None], what: str,
          hashes_of_skipped: dict[str, str] | None = None, listing=None) -> ImageSet:
    """Hash and decode-check the images of ``folder`` (``listing``: its :func:`list_images` result, when the
    caller has it already)."""
    files, skipped = listing if listing is not None else list_images(folder, extensions)
    skipped = list(skipped)
    paths, hashes = [], []
    for p in files:
        try:
            h = sha256_file(p)
        except OSError as e:
            skipped.append((str(p), f"cannot be read ({e.strerror or e})"))
            continue
        if h not in known:
            known[h] = check_image(p)
        if known[h] is None:
            paths.append(p)
            hashes.append(h)
        else:
            skipped.append((str(p), known[h]))
            if hashes_of_skipped is not None:
                hashes_of_skipped[str(p)] = h
    if skipped:
        log(f"{what}: skipped {len(skipped)} unreadable file(s) in {folder!r}, e.g. {skipped[0][0]!r}: "
            f"{skipped[0][1]} (all listed in the teacher report)")
    return ImageSet(paths, hashes, sorted(skipped), str(folder))


_CACHE: dict[tuple, ImageSet] = {}


def unlabeled_set(job, record: bool = True) -> ImageSet:
    """``data.unlabeled`` as an :class:`ImageSet`, listed and hashed once per process and run folder.

    Raises ``FileNotFoundError`` naming ``data.unlabeled`` when no readable image is left. With ``record``
    the listing (every file, its sha256 or why it was skipped) is written to ``teacher/images.parquet``.
    """
    folder, exts = job.data.unlabeled, tuple(job.data.extensions)
    paths = RunPaths(job.run_path)
    listing = list_images(folder, exts)
    stat = tuple((str(p), *_stat(p)) for p in listing[0])
    key = (str(folder), exts, str(job.run_path), stat)
    if key in _CACHE:
        return _CACHE[key]
    old = None  # the earlier run's index: its decode verdicts by content hash, and whether to rewrite it
    if paths.images_index.is_file():
        try:
            old = read_table(paths.images_index)
        except Exception:  # noqa: BLE001 - an unreadable index only costs a re-check
            old = None
    known: dict[str, str | None] = {r["sha256"]: r["skipped"] for r in old or [] if r["sha256"]}
    skipped_sha: dict[str, str] = {}
    s = _scan(folder, exts, known, "data.unlabeled", skipped_sha, listing)
    if not len(s):
        why = f"; {len(s.skipped)} file(s) could not be read, e.g. {s.skipped[0][0]!r}: {s.skipped[0][1]}" \
            if s.skipped else ""
        raise FileNotFoundError(f"data.unlabeled: no readable images in {folder!r} (looked for "
                                f"{', '.join(exts)}, any case){why}. Point data.unlabeled at a folder of images.")
    if record:
        rows = [{"path": str(p.resolve()), "sha256": h, "skipped": None} for p, h in zip(s.paths, s.sha256)]
        rows += [{"path": p, "sha256": skipped_sha.get(p), "skipped": why} for p, why in s.skipped]
        if old != rows:
            write_table(paths.images_index, {k: [r[k] for r in rows] for k in ("path", "sha256", "skipped")})
    _CACHE[key] = s
    return s


def eval_set(job) -> ImageSet | None:
    """The images of ``data.eval`` in the sub-folders named by the job's classes (ClassSpec.folder, or the name),
    or None without ``data.eval``. Teachers predict them without labels; only evaluation code maps the folder
    names to classes. Images in other folders are left out and counted (``skipped``)."""
    if not job.data.eval:
        return None
    s = _scan(job.data.eval, tuple(job.data.extensions), {}, "data.eval")
    root = Path(job.data.eval)
    folders = {c.folder or c.name for c in job.classes}
    keep = [i for i, p in enumerate(s.paths) if p.relative_to(root).parts[0] in folders]
    other = sorted({s.paths[i].relative_to(root).parts[0] for i in range(len(s)) if i not in set(keep)})
    out = s.subset(keep)
    out.skipped = s.skipped + [(str(root / f), "folder is not a class of the job") for f in other]
    if other:
        log(f"data.eval: {len(s) - len(keep)} image(s) in {len(other)} folder(s) that name no class of the job "
            f"({', '.join(other[:5])}{' ...' if len(other) > 5 else ''}) are left out of evaluation")
    if not len(out):
        raise FileNotFoundError(f"data.eval: no images in {str(root)!r} under folders named like the job's classes "
                                f"({', '.join(sorted(folders))}); set classes[].folder to the folder names, or "
                                "remove data.eval.")
    return out


def _stat(p: Path) -> tuple[int, int]:
    try:
        st = p.stat()
        return st.st_size, st.st_mtime_ns
    except OSError:
        return -1, -1


def check_table_paths(job, rows: list[dict], table: str | os.PathLike, column: str = "path") -> None:
    """Refuse a table row whose image path lies outside the run folder and the job's data folders.

    Allowed: a path inside the run folder or ``data.unlabeled`` (after resolving ``..`` and links), a file the
    listing of ``data.unlabeled`` reaches through a link, and with ``teacher.synth.source: table`` the images the
    placed ``teacher/synthetic.parquet`` names. Raises ``ValueError`` naming the first offending row.
    """
    roots = [Path(job.run_path).resolve(), Path(job.data.unlabeled).resolve()]
    extra: set[str] | None = None
    for i, r in enumerate(rows):
        p = r.get(column)
        if not isinstance(p, str) or not p:
            continue  # missing paths are the table validator's business
        real = Path(p).resolve()
        if any(real.is_relative_to(root) for root in roots):
            continue
        if extra is None:  # only when needed: links inside data.unlabeled, the placed synthetic table
            files, _ = list_images(job.data.unlabeled, tuple(job.data.extensions))
            extra = {str(f.resolve()) for f in files}
            paths = RunPaths(job.run_path)
            if job.teacher.synth.source == "table" and paths.synthetic.is_file():
                extra |= {str(Path(x["path"]).resolve()) for x in read_table(paths.synthetic) if x.get("path")}
        if str(real) in extra:
            continue
        raise ValueError(f"{str(table)!r} row {i} (path {p!r}): the image lies outside the run folder "
                         f"{str(roots[0])!r} and data.unlabeled {str(roots[1])!r}, so it is not read. Rerun the teacher "
                         "stage to rebuild the table, or put the image in data.unlabeled.")
