"""The teacher interface: a teacher is one module that registers itself, and one runner runs them all.

A probability teacher declares, where it is defined (as timm's ``@register_model``)::

    @dataclass
    class MyCfg(TeacherSettings):          # its settings: job key teacher.<name>.*
        k: int = 16                         # one short comment per field
        def check(self, key):               # optional: raise ValueError naming f"{key}.k"
            ...

    @register_teacher("mine", settings=MyCfg, roles=("clip",), needs=("teacher:clip",),
                      columns=("mine",))
    def run_mine(ctx: TeacherContext) -> TeacherResult:
        ...                                 # (N, C) probabilities for ctx.images (and, optionally, for
                                            # ctx.eval_images and ctx.synthetic_images)

- ``roles``: the model roles it loads (``models.<role>``), checked before any work.
- ``needs``: ``"teacher:<name>"`` (that teacher's columns, in ``ctx.columns``; it runs first, even when it is
  not enabled itself), ``"synthetic"`` (the synthetic set, ``ctx.synthetic``), ``"features:<role>"``
  (uses the shared feature store of that role's encoder; no ordering needed).
- ``columns``: the probability columns it writes (default: its name). Each becomes
  ``teacher/probs/<column>.parquet`` and a ``p_<column>`` column of ``pseudo_labels.parquet``; the
  ensemble weighs columns (``teacher.ensemble.weights``).

The runner (:func:`run_teachers`) orders teachers by their needs, runs every enabled one (and what they need),
and does list -> hash -> stamp -> skip -> write once for all: a teacher only computes.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from distillery import killpoints
from distillery.rundir import RunPaths, is_done, log, mark_done, read_table, save_resolved_job, settings_hash, \
    write_json, write_table

__all__ = ["TeacherSettings", "TeacherSpec", "TeacherContext", "TeacherResult", "TEACHERS", "register_teacher",
           "teacher_order", "run_teachers", "all_columns", "column_owner", "teachers_to_run", "ensemble_weights",
           "agreement_weights", "default_columns"]


@dataclass
class TeacherSettings:
    """Settings every probability teacher has; a teacher's own dataclass extends these."""

    enabled: bool = True  # run this teacher (also run when another enabled teacher needs it)
    device: str = "auto"  # "auto", "cpu", "cuda", "cuda:1" ...

    def check(self, key: str) -> None:
        """Raise ValueError naming ``{key}.<field>``, the value and the fix; the base checks nothing."""

    def reads(self) -> list[str]:
        """Probability columns of other teachers these settings make the teacher read (beyond its registered
        needs): they order it after those teachers and enter its stamp, but it does not *build on* them (the
        default ensemble still counts both). The base reads none."""
        return []


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    run: Callable[["TeacherContext"], "TeacherResult"]
    settings: type
    roles: tuple[str, ...] = ()
    needs: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    version: str = "1"  # bump when the method changes what it computes, so stamps are invalidated
    doc: str = ""

    @property
    def final(self) -> str:
        """The teacher's own answer (its last column), what the default ensemble weighs."""
        return self.columns[-1]

    @property
    def teacher_needs(self) -> list[str]:
        return [n.split(":", 1)[1] for n in self.needs if n.startswith("teacher:")]


TEACHERS: dict[str, TeacherSpec] = {}


def register_teacher(name: str, *, settings: type = TeacherSettings, roles: tuple[str, ...] = (),
                     needs: tuple[str, ...] = (), columns: tuple[str, ...] | None = None, version: str = "1"):
    """Decorator: register ``fn(ctx) -> TeacherResult`` as the teacher ``name`` (see the module docstring)."""
    if not name.isidentifier():
        raise ValueError(f"register_teacher: {name!r} is not a valid teacher name (letters, digits, _).")
    for n in needs:
        kind = n.split(":", 1)[0]
        if kind not in ("teacher", "synthetic", "features"):
            raise ValueError(f"register_teacher({name!r}): unknown need {n!r}; use 'teacher:<name>', 'synthetic' "
                             "or 'features:<role>'.")

    def deco(fn: Callable) -> Callable:
        TEACHERS[name] = TeacherSpec(name, fn, settings, tuple(roles), tuple(needs), tuple(columns or (name,)),
                                     version, (fn.__doc__ or "").strip().splitlines()[0] if fn.__doc__ else "")
        return fn

    return deco


def all_columns() -> dict[str, str]:
    """Every probability column a registered teacher can write -> the teacher that writes it."""
    return {c: s.name for s in TEACHERS.values() for c in s.columns}


def column_owner(column: str) -> str | None:
    return all_columns().get(column)


def teacher_order(names: list[str], reads: dict[str, list[str]] | None = None) -> list[str]:
    """``names`` plus everything they need, dependencies first (stable: registration order otherwise).

    ``reads``: teacher -> other teachers whose columns its settings read; those come first too, when they run."""
    order: list[str] = []
    visiting: list[str] = []

    def visit(n: str) -> None:
        if n in order:
            return
        if n in visiting:
            raise ValueError(f"teachers: circular needs {' -> '.join(visiting + [n])}.")
        if n not in TEACHERS:
            raise ValueError(f"teachers: {n!r} is needed but not registered; available: {', '.join(TEACHERS)}.")
        visiting.append(n)
        for d in TEACHERS[n].teacher_needs:
            visit(d)
        for d in (reads or {}).get(n, []):
            if d in names:
                visit(d)
        visiting.pop()
        order.append(n)

    for n in [t for t in TEACHERS if t in names]:
        visit(n)
    return order


def default_columns(job) -> list[str]:
    """The final column of every running teacher that no other running teacher builds on (e.g. AiR's
    prompt-learned column rather than the zero-shot CLIP it refines): what the default ensemble fuses."""
    running = teachers_to_run(job)
    used = {d for t in running for d in TEACHERS[t].teacher_needs}
    return [TEACHERS[t].final for t in running if t not in used]


def agreement_weights(probs: dict[str, np.ndarray]) -> dict[str, float]:
    """Label-free weights: w_t = share of (image, other column) pairs whose argmax agrees with column t's,
    w_t = mean_i (1/(T-1)) Σ_{s≠t} [argmax p_t(i) = argmax p_s(i)]. One column gets 1; all-zero falls back to
    equal weights. (With two columns the weights are necessarily equal: agreement is symmetric.)"""
    cols = list(probs)
    if len(cols) < 2:
        return {c: 1.0 for c in cols}
    top = np.stack([np.asarray(probs[c]).argmax(axis=1) for c in cols])  # (T, N)
    same = (top[:, None, :] == top[None, :, :]).mean(axis=2)  # (T, T) agreement rates
    w = (same.sum(axis=1) - 1.0) / (len(cols) - 1)
    if not np.any(w > 0):
        return {c: 1.0 for c in cols}
    return {c: round(float(x), 6) for c, x in zip(cols, w)}


def ensemble_weights(job, probs: dict[str, np.ndarray] | None = None, prior: np.ndarray | None = None,
                     details: dict | None = None) -> tuple[dict[str, float], str]:
    """(weights, why): ``teacher.ensemble.weights`` when given; else, with ``weighting: dawid_skene`` (default),
    every column of the teachers that ran, weighted by its accuracy estimated without labels (teacher/fusion.py;
    the estimates go into ``details``); with ``agreement`` / ``equal`` the default columns, weighted by
    :func:`agreement_weights` on ``probs`` or equally."""
    cfg = job.teacher.ensemble
    if cfg.weights:
        return dict(cfg.weights), "fixed (teacher.ensemble.weights)"
    if cfg.weighting == "dawid_skene" and probs is not None:
        from .fusion import dawid_skene_weights

        running = teachers_to_run(job)
        cols = [c for t in running for c in TEACHERS[t].columns if c in probs]
        linked = [[c for c in TEACHERS[t].columns if c in probs] for t in running]
        # columns computed from the same frozen image features (a "features:<role>" need) are one view of the
        # images, not independent raters: they are linked too
        views: dict[str, list[str]] = {}
        for t in running:
            for n in TEACHERS[t].needs:
                if n.startswith("features:"):
                    views.setdefault(n, []).extend(c for c in TEACHERS[t].columns if c in probs)
        linked += [v for v in views.values() if len(v) > 1]
        # a teacher built on another's column (trained on its pseudo-labels, or fusing it) copies its mistakes
        for t in running:
            for d in TEACHERS[t].teacher_needs + read_teachers(job, t):
                pair = [c for c in (*TEACHERS[d].columns, *TEACHERS[t].columns) if c in probs]
                if len(pair) > 1:
                    linked.append(pair)
        w, det = dawid_skene_weights({c: probs[c] for c in cols}, prior, cfg.redundancy_kappa, cfg.collapse_tv,
                                     linked)
        if details is not None:
            details.update(det)
        why = ("Dawid-Skene: each column's accuracy estimated without labels (chance-corrected latent truth; the "
               "columns of one teacher, of one frozen feature store, of a teacher and the teacher it builds on, and "
               f"columns with kappa >= {cfg.redundancy_kappa:g} counted once), log-odds weights")
        if det.get("note"):
            why += f"; {det['note']}"
        return w, why
    cols = default_columns(job)
    if cfg.weighting == "agreement" and probs is not None and len(cols) > 2:
        return agreement_weights({c: probs[c] for c in cols}), \
            "agreement of each final column's argmax with the others' on the unlabeled images"
    why = "equal: one final column" if len(cols) == 1 else (
        "equal: with two columns agreement weights are equal" if cfg.weighting == "agreement" else "equal")
    return {c: 1.0 for c in cols}, why


def read_teachers(job, name: str) -> list[str]:
    """The teachers whose columns teacher ``name``'s settings read (see :meth:`TeacherSettings.reads`)."""
    owners = all_columns()
    return [owners[c] for c in job.teacher.settings(name).reads() if c in owners]


def teachers_to_run(job) -> list[str]:
    """The enabled teachers of ``job`` and what they need, in the order they run."""
    enabled = [n for n in TEACHERS if job.teacher.settings(n).enabled]
    needed = teacher_order(enabled)
    return teacher_order(needed, {n: read_teachers(job, n) for n in needed})


@dataclass
class TeacherContext:
    """What a teacher gets: the job, its settings, the images, the shared stores, the columns so far."""

    job: Any
    name: str
    cfg: Any  # this teacher's settings (job.teacher.<name>)
    paths: RunPaths
    images: Any  # distillery.images.ImageSet: the unlabeled images, rows of every column
    eval_images: Any | None  # the evaluation images (no labels), or None
    executor: Any
    progress: bool = True
    columns: dict[str, np.ndarray] = field(default_factory=dict)  # earlier teachers' (N, C) columns
    eval_columns: dict[str, np.ndarray] = field(default_factory=dict)  # the same on eval_images
    synthetic: list[dict] | None = None  # rows of synthetic.parquet (needs "synthetic")
    synthetic_images: Any | None = None  # the same rows as an ImageSet (for synthetic_probs), or None
    synthetic_columns: dict[str, np.ndarray] = field(default_factory=dict)  # earlier columns on synthetic_images
    prior: np.ndarray | None = None  # (C,) class shares the columns are matched to (teacher/prior.py); None = no prior
    seed: int = 0  # the job seed (tie-breaking hashes, data order)

    @property
    def out_dir(self) -> Path:
        """This teacher's own folder (``teacher/<name>/``) for side tables and weights."""
        return self.paths.teacher_dir(self.name)

    @property
    def num_classes(self) -> int:
        return len(self.job.classes)

    def device(self) -> str:
        from distillery.models import pick_device

        return pick_device(self.cfg.device, key=f"teacher.{self.name}.device")


@dataclass
class TeacherResult:
    """What a teacher returns: (N, C) probabilities per column (rows = ``ctx.images``), and optionally the
    same columns on ``ctx.eval_images`` and ``ctx.synthetic_images``, side tables (written to ``teacher/<name>/<table>.parquet``) and
    figures for the report."""

    probs: dict[str, np.ndarray]
    eval_probs: dict[str, np.ndarray] = field(default_factory=dict)
    synthetic_probs: dict[str, np.ndarray] = field(default_factory=dict)  # on ctx.synthetic_images: lets the
    # ensemble drop synthetic images the teachers strongly disagree with (optional per teacher)
    tables: dict[str, Any] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


def _write_probs(path: Path, images, probs: np.ndarray, root: Path) -> None:
    write_table(path, {"path": images.str_paths, "sha256": list(images.sha256),
                       "probs": [row.tolist() for row in np.asarray(probs, np.float32)]}, relative_to=root)


def _as_stored(p) -> np.ndarray:
    """A column as the next teacher reads it back from its file (float32, then float64): an uninterrupted run and
    one resumed from the files then feed identical numbers to the teachers that build on it."""
    return np.asarray(p, np.float32).astype(np.float64)


def read_probs(path: Path, images, what: str) -> np.ndarray:
    """A probability table, aligned to ``images`` by sha256."""
    rows = read_table(path, what)
    by_sha = {r["sha256"]: r["probs"] for r in rows}
    missing = [s for s in images.sha256 if s not in by_sha]
    if missing:
        raise ValueError(f"{what} {str(path)!r} has no row for {len(missing)} image(s); rerun `distillery teacher`.")
    return np.asarray([by_sha[s] for s in images.sha256], dtype=np.float64)


def _check_result(spec: TeacherSpec, res: TeacherResult, n: int, n_eval: int | None, c: int,
                  n_syn: int | None = None) -> None:
    if set(res.probs) != set(spec.columns):
        raise RuntimeError(f"teacher {spec.name!r} returned columns {sorted(res.probs)}, registered {list(spec.columns)}.")
    for col, p in res.probs.items():
        p = np.asarray(p)
        if p.shape != (n, c):
            raise RuntimeError(f"teacher {spec.name!r}: column {col!r} has shape {p.shape}, expected ({n}, {c}).")
        if not np.all(np.isfinite(p)) or np.abs(p.sum(axis=1) - 1).max() > 1e-3 or p.min() < -1e-6:
            raise RuntimeError(f"teacher {spec.name!r}: column {col!r} is not a probability distribution per row.")
    for what, m, extra in (("eval", n_eval, res.eval_probs), ("synthetic", n_syn, res.synthetic_probs)):
        if extra and m is None:
            raise RuntimeError(f"teacher {spec.name!r} returned {what} columns but was given no {what} images.")
        for col, p in extra.items():
            if col not in spec.columns or np.asarray(p).shape != (m, c):
                raise RuntimeError(f"teacher {spec.name!r}: {what} column {col!r} has shape {np.shape(p)}, "
                                   f"expected one of {list(spec.columns)} with shape ({m}, {c}).")


def teacher_key(job, spec: TeacherSpec, images, eval_images, input_files: list[Path], syn_images=None,
                prior: list[float] | None = None) -> str:
    from distillery.rundir import sha256_file

    roles = {r: getattr(job.models, r) for r in spec.roles}
    settings = {k: v for k, v in asdict(job.teacher.settings(spec.name)).items() if k != "device"}
    parts = [spec.name, spec.version, settings, job.class_names, job.domain, job.seed, roles, list(images.sha256),
             list(eval_images.sha256) if eval_images is not None else None,
             [(p.name, sha256_file(p)) for p in input_files],
             list(syn_images.sha256) if syn_images is not None else None]
    if prior is not None:  # no prior: the key of a run without one is unchanged
        parts.append({"prior": [round(float(x), 8) for x in prior]})
    return settings_hash(*parts)


def _match_columns(res: TeacherResult, prior: np.ndarray | None) -> dict:
    """Match every column of ``res`` to the prior (teacher/prior.py), in place: the bias is fitted on the
    unlabeled rows and applied to the evaluation and synthetic rows. Returns, per column, the uncorrected and
    corrected argmax counts, the bias, and the uncorrected evaluation column (for the report and eval.json)."""
    from .prior import match_prior

    out: dict = {}
    if prior is None:
        return out
    for col, p in list(res.probs.items()):
        others = [c for c in (res.eval_probs.get(col), res.synthetic_probs.get(col)) if c is not None]
        before = np.asarray(p).argmax(axis=1)
        fixed, rest, b = match_prior(p, prior, others)
        raw_eval = res.eval_probs.get(col)
        res.probs[col] = fixed
        it = iter(rest)
        if col in res.eval_probs:
            res.eval_probs[col] = next(it)
        if col in res.synthetic_probs:
            res.synthetic_probs[col] = next(it)
        c = len(prior)
        out[col] = {"counts_uncorrected": np.bincount(before, minlength=c).tolist(),
                    "counts": np.bincount(fixed.argmax(axis=1), minlength=c).tolist(),
                    "bias": np.round(b, 6).tolist(), "raw_eval": raw_eval}
    return out


def run_teachers(job, images, eval_images, executor, progress: bool = True, synthetic: list[dict] | None = None,
                 synthetic_file: Path | None = None) -> dict:
    """Run every teacher of ``job`` in need order; each skips itself when its stamp matches."""
    from distillery.images import ImageSet

    paths = RunPaths(job.run_path)
    columns: dict[str, np.ndarray] = {}
    eval_columns: dict[str, np.ndarray] = {}
    syn_columns: dict[str, np.ndarray] = {}
    syn_images = ImageSet([Path(r["path"]) for r in synthetic], [r["sha256"] for r in synthetic]) \
        if synthetic else None
    info: dict[str, Any] = {}
    from .prior import resolve_prior

    prior_info = resolve_prior(job, images, synthetic, executor, progress)
    write_json(paths.prior, {k: v for k, v in prior_info.items()})
    prior = np.asarray(prior_info["prior"]) if prior_info["prior"] is not None else None
    if prior is not None:
        log(f"prior: {prior_info['mode']} ({prior_info['why']}): " + ", ".join(
            f"{c} {x:.3f}" for c, x in zip(job.class_names, prior)))
    elif prior_info["requested"] != "none":
        log(f"prior: none: {prior_info['why']}")
    info["prior"] = prior_info
    uncorrected_eval: dict[str, np.ndarray] = {}
    running = teachers_to_run(job)
    for name in running:
        spec = TEACHERS[name]
        cfg = job.teacher.settings(name)
        if not cfg.enabled:
            log(f"{name}: runs because {', '.join(t for t in running if name in TEACHERS[t].teacher_needs)} "
                "needs it")
        if "synthetic" in spec.needs and synthetic is None:
            raise ValueError(f"teacher.{name}: needs the synthetic set, but there is none; enable teacher.synth "
                             f"(or provide {str(paths.synthetic)!r}), or set teacher.{name}.enabled=false.")
        inputs = [paths.probs(c) for d in spec.teacher_needs for c in TEACHERS[d].columns]
        inputs += [paths.probs(c) for c in cfg.reads() if paths.probs(c) not in inputs]
        if "synthetic" in spec.needs and synthetic_file is not None:
            inputs.append(synthetic_file)
        key = teacher_key(job, spec, images, eval_images, inputs, syn_images, prior_info["prior"])
        outs = [paths.probs(c) for c in spec.columns]
        extra_outs = [f(c) for c in spec.columns for f in (paths.eval_probs, paths.synthetic_probs,
                                                             paths.eval_probs_uncorrected)]
        stage = f"teacher-{name}"
        if is_done(paths.teacher, stage, key, outs):
            log(f"{name}: up to date ({len(images)} images -> {', '.join(o.name for o in outs)})")
            for c in spec.columns:
                columns[c] = read_probs(paths.probs(c), images, f"{c} probabilities")
                if eval_images is not None and paths.eval_probs(c).is_file():
                    eval_columns[c] = read_probs(paths.eval_probs(c), eval_images, f"{c} evaluation probabilities")
                if syn_images is not None and paths.synthetic_probs(c).is_file():
                    syn_columns[c] = read_probs(paths.synthetic_probs(c), syn_images, f"{c} synthetic probabilities")
                if eval_images is not None and paths.eval_probs_uncorrected(c).is_file():
                    uncorrected_eval[c] = read_probs(paths.eval_probs_uncorrected(c), eval_images,
                                                     f"{c} evaluation probabilities before the prior")
            info[name] = {"images": len(images), "computed": 0}
            continue
        save_resolved_job(job, paths.teacher)
        ctx = TeacherContext(job, name, cfg, paths, images, eval_images, executor, progress, dict(columns),
                             dict(eval_columns), synthetic, syn_images, dict(syn_columns), prior, job.seed)
        t0 = time.perf_counter()
        res = spec.run(ctx)
        elapsed = time.perf_counter() - t0
        killpoints.progress(f"teacher.{name}.computed")  # testing hook: computed, nothing written yet
        _check_result(spec, res, len(images), len(eval_images) if eval_images is not None else None, len(job.classes),
                      len(syn_images) if syn_images is not None else None)
        matched = _match_columns(res, prior)
        for c, p in res.probs.items():
            _write_probs(paths.probs(c), images, p, paths.root)
            columns[c] = _as_stored(p)
            killpoints.progress(f"teacher.{name}.column")
        for o in extra_outs:
            o.unlink(missing_ok=True)
        for c, p in res.eval_probs.items():
            _write_probs(paths.eval_probs(c), eval_images, p, paths.root)
            eval_columns[c] = _as_stored(p)
            raw = matched.get(c, {}).pop("raw_eval", None)
            if raw is not None:
                _write_probs(paths.eval_probs_uncorrected(c), eval_images, raw, paths.root)
                uncorrected_eval[c] = _as_stored(raw)
        for m in matched.values():
            m.pop("raw_eval", None)
        for c, p in res.synthetic_probs.items():
            _write_probs(paths.synthetic_probs(c), syn_images, p, paths.root)
            syn_columns[c] = _as_stored(p)
        for tname, rows in res.tables.items():
            write_table(ctx.out_dir / f"{tname}.parquet", rows, relative_to=paths.root)
        stamp = {**res.info, "images": len(images), "seconds": round(elapsed, 2)}
        if matched:
            stamp["prior_match"] = matched
        killpoints.progress(f"teacher.{name}.written")  # every output written, not stamped yet
        mark_done(paths.teacher, stage, key, stamp)
        log(f"{name}: {len(images)} images in {elapsed:.1f}s -> {', '.join(o.name for o in outs)}")
        info[name] = {**stamp, "computed": len(images)}
    return {"columns": columns, "eval_columns": eval_columns, "synthetic_columns": syn_columns, "info": info,
            "uncorrected_eval_columns": uncorrected_eval, "prior": prior}
