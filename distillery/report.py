"""The run report: one self-contained ``runs/<job>/report.html`` a user opens to trust (or distrust) a model
trained on labels no person checked.

It reads only the run folder (the files :class:`~distillery.rundir.RunPaths` names and the stages' stamps), so
it can be rebuilt at any time (``distillery report --job FILE``) and is refreshed at the end of every stage
command. A section per stage that ran:

- **synthesis**: a grid per trick, the domain LoRA's loss curve, counts per class and trick;
- **teachers**: per-column class and confidence histograms, the agreement matrix between columns, AiR's
  prototypes, skipped inputs with reasons, the ensemble weights and why, and (with ``data.eval``) each
  column's top-1 there (evaluation only);
- **student**: loss and accuracy per epoch, the confusion matrix, per-class accuracy, throughput;
- **export**: the ladder (format x agreement x max |delta logit| x accuracy where known x latency x size),
  the gates' verdicts, the deploy choice and the runtime code that loads it.

Plots are matplotlib (Agg) PNGs and every image is embedded as a ``data:`` URI: the page needs no network and
works from ``file://``. The HTML comes from ``distillery/templates/report.html.j2`` with autoescaping, so a
class name such as ``<script>`` is shown, never run. Every figure names the job, the stage and the settings
hash (the stage stamp's ``key``) that produced it under it (and, for the plots drawn here, in the image itself).
The page holds no timestamp: an unchanged run folder gives byte-identical HTML, and the file is then left
untouched. Each section carries a key of the files it is drawn from (size, mtime), the job and this code; a
refresh keeps a section of the page on disk whose key still matches, so a stage redraws only its own section.
"""
from __future__ import annotations

import base64
import io
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .rundir import RunPaths, log, read_json, read_stamp, stamp_path, write_bytes

__all__ = ["build_report", "refresh_report", "agreement_matrix", "confusion_png", "runtime_snippet"]

TEMPLATE = "report.html.j2"
SECTIONS = ("synthesis", "teachers", "student", "export")  # the page's section ids, in order
_SKIPPED_SHOWN = 200


# ------------------------------------------------------------------------------------------------------------
# Pure pieces


def agreement_matrix(columns: dict[str, Any]) -> tuple[list[str], np.ndarray]:
    """``{column: (N, C) probabilities}`` -> (names, (K, K) matrix): the share of the N images on which two
    columns' argmax agree (1 on the diagonal). Uses no labels."""
    names = list(columns)
    top = [np.asarray(columns[n]).argmax(axis=1) for n in names]
    k = len(names)
    m = np.ones((k, k), dtype=np.float64)
    for i in range(k):
        for j in range(k):
            if i != j:
                m[i, j] = float((top[i] == top[j]).mean()) if len(top[i]) else float("nan")
    return names, m


def mpl_text(text: str) -> str:
    """A string matplotlib draws literally (``$`` would otherwise start mathtext)."""
    return str(text).replace("$", r"\$")


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def runtime_snippet(export_dir: str | os.PathLike, cwd: str | os.PathLike | None = None) -> str:
    """The three lines of runtime code that load the deployed model of a run."""
    export_dir = Path(export_dir).resolve()
    cwd = Path(cwd or os.getcwd()).resolve()
    try:
        shown = export_dir.relative_to(cwd).as_posix()
    except ValueError:
        shown = export_dir.as_posix()
    return ("from distillery.runtime import Classifier\n"
            f"clf = Classifier.load({shown!r})   # the format report.json deploys\n"
            "print(clf.predict([\"image.jpg\"], topk=3))")


@dataclass
class Provenance:
    """Which job, stage and settings produced a figure."""

    job: str
    stage: str
    key: str | None

    @property
    def short(self) -> str:
        return (self.key or "not stamped")[:12]

    @property
    def line(self) -> str:
        return f"job {self.job} · stage {self.stage} · settings {self.short}"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig, prov: Provenance) -> bytes:
    """A figure as PNG bytes with its provenance line drawn in; deterministic (no metadata)."""
    plt = _plt()
    # above everything the figure holds (the tight bounding box grows to include it)
    fig.text(0.0, 1.01, mpl_text(prov.line), fontsize=7, color="#666666", ha="left", va="bottom")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None}, bbox_inches="tight", pad_inches=0.15)
    plt.close(fig)
    return buf.getvalue()


def confusion_png(confusion, class_names: list[str], prov: Provenance | None = None,
                  title: str = "Confusion matrix (rows: true class, columns: predicted; colour: share of row)",
                  ) -> bytes:
    """The confusion matrix (``[true][predicted]`` counts) as a row-normalised matplotlib heatmap with counts."""
    plt = _plt()
    m = np.asarray(confusion, dtype=np.float64)
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    k = len(class_names)
    side = max(4.0, 0.42 * k + 2.5)
    fig, ax = plt.subplots(figsize=(side + 1.5, side))
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    labels = [mpl_text(c) for c in class_names]
    ax.set_xticks(range(k), labels, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(k), labels, fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(mpl_text(title), fontsize=9)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    return _png(fig, prov or Provenance("", "student", None))


# ------------------------------------------------------------------------------------------------------------
# Collecting what the run folder holds


@dataclass
class Figure:
    title: str
    src: str  # data: URI
    prov: Provenance
    note: str = ""


@dataclass
class Section:
    id: str
    title: str
    key: str | None = None
    figures: list[Figure] = field(default_factory=list)
    facts: list[tuple[str, str]] = field(default_factory=list)  # (label, value)
    tables: list[dict] = field(default_factory=list)  # {"title", "head": [...], "rows": [[...]], "note"}
    code: str = ""
    notes: list[str] = field(default_factory=list)


class _Run:
    def __init__(self, job):
        self.job = job
        self.paths = RunPaths(job.run_path)
        self.name = job.name

    def stamp_key(self, folder: Path, stage: str) -> str | None:
        return read_stamp(folder, stage).get("key")

    def prov(self, stage: str, folder: Path, stamp: str) -> Provenance:
        return Provenance(self.name, stage, self.stamp_key(folder, stamp))

    def file_figure(self, title: str, path: Path, prov: Provenance, note: str = "") -> Figure | None:
        if not path.is_file():
            return None
        return Figure(title, data_uri(path.read_bytes()), prov, note)


def _fmt(v, digits: int = 4) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if v != v:
            return "–"
        return f"{v:.{digits}f}"
    return str(v)


def _synthesis(run: _Run) -> Section | None:
    from .rundir import read_table

    p = run.paths
    has_lora = p.lora_loss.is_file()
    if not (p.synthetic.is_file() or has_lora):
        return None
    sec = Section("synthesis", "Synthesis: what the generator made", key=run.stamp_key(p.teacher, "synth"))
    if has_lora:
        info = read_json(p.lora_loss)
        prov = run.prov("teacher/lora", p.lora, "lora")
        loss = [float(x) for x in info.get("loss") or []]
        if loss:
            plt = _plt()
            fig, ax = plt.subplots(figsize=(6.5, 3))
            ax.plot(range(1, len(loss) + 1), loss, lw=1, color="#1f77b4", label="step loss")
            if len(loss) >= 5:
                w = max(2, len(loss) // 10)
                smooth = np.convolve(loss, np.ones(w) / w, mode="valid")
                ax.plot(range(w, len(loss) + 1), smooth, lw=2, color="#d62728", label=f"mean of {w}")
            ax.set_xlabel("optimizer step")
            ax.set_ylabel("noise-prediction MSE")
            ax.set_title(mpl_text(f"Domain LoRA loss (caption {info.get('caption', '')!r})"), fontsize=9)
            ax.legend(fontsize=8)
            sec.figures.append(Figure("Domain LoRA: training loss per step", data_uri(_png(fig, prov)), prov))
        sec.facts += [
            ("LoRA", f"{info.get('steps')} steps on {info.get('images')} unlabeled images at "
                     f"{info.get('resolution')} px "
                     f"on {info.get('device')} ({info.get('train_seconds')} s)"),
            ("LoRA trainable parameters", f"{info.get('trainable_params', 0):,} of {info.get('unet_params', 0):,} "
                                          f"({info.get('trainable_share', 0):.2%})"),
            ("LoRA loss", f"{_fmt(info.get('loss_first_10pct'))} (first 10% of steps) → "
                          f"{_fmt(info.get('loss_last_10pct'))} (last 10%)"),
        ]
    elif run.job.teacher.lora.enabled is False:
        sec.notes.append("No domain LoRA (teacher.lora.enabled: false).")
    if p.synthetic.is_file():
        rows = read_table(p.synthetic)
        tricks = sorted({r["trick"] for r in rows}, key=lambda t: (t != "base", t))
        classes = run.job.class_names
        st = read_stamp(p.teacher, "synth")
        sec.facts.append(("synthetic images", f"{len(rows)} ({len(classes)} classes × {len(tricks)} tricks: "
                                              f"{', '.join(tricks)})"))
        if st.get("seconds") is not None:
            sec.facts.append(("synthesis time", f"{st['seconds']} s"))
        count = {(r["class_name"], r["trick"]): 0 for r in rows}
        for r in rows:
            count[(r["class_name"], r["trick"])] += 1
        sec.tables.append({"title": "Images per class and trick", "head": ["class", *tricks, "total"],
                           "rows": [[c, *[count.get((c, t), 0) for t in tricks],
                                     sum(count.get((c, t), 0) for t in tricks)] for c in classes]})
        prov = run.prov("teacher/synth", p.teacher, "synth")
        example = {}
        for r in rows:
            example.setdefault(r["trick"], r.get("prompt", ""))
        for t in tricks:
            f = run.file_figure(f"Trick {t}: a row per class", p.grid(t), prov,
                                note=f"e.g. prompt {example.get(t, '')!r}")
            if f:
                sec.figures.append(f)
    return sec


def _column_arrays(rows: list[dict]) -> dict[str, np.ndarray]:
    cols = [k[2:] for k in rows[0] if k.startswith("p_") and isinstance(rows[0][k], (list, tuple))] if rows else []
    out = {c: np.asarray([r[f"p_{c}"] for r in rows], dtype=np.float64) for c in cols}  # probability vectors only
    if rows and "soft_target" in rows[0]:
        out["ensemble"] = np.asarray([r["soft_target"] for r in rows], dtype=np.float64)
    return out


def _small_multiples(n: int, per_row: int = 4, w: float = 3.4, h: float = 2.6, sharey: bool = True):
    plt = _plt()
    cols = min(n, per_row)
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(w * cols + 1.5, h * rows), sharey=sharey, squeeze=False,
                             layout="constrained")
    flat = axes.ravel().tolist()
    for ax in flat[n:]:
        ax.axis("off")
    return fig, flat[:n]


def _teachers(run: _Run) -> Section | None:
    from .rundir import read_table

    p = run.paths
    if not (p.pseudo_labels.is_file() or p.images_index.is_file()):
        return None
    sec = Section("teachers", "Teachers: how the pseudo-labels were made",
                  key=run.stamp_key(p.teacher, "ensemble"))
    classes = run.job.class_names
    prov = run.prov("teacher/ensemble", p.teacher, "ensemble")
    if p.pseudo_labels.is_file():
        rows = read_table(p.pseudo_labels)
        arrays = _column_arrays(rows)
        sec.facts.append(("real images pseudo-labeled", str(len(rows))))
        sec.facts.append(("probability columns", ", ".join(arrays)))
        if arrays:
            plt = _plt()
            labels = [mpl_text(c) for c in classes]
            fig, axes = _small_multiples(len(arrays), h=max(2.6, 0.28 * len(classes) + 1))
            for ax, (name, a) in zip(axes, arrays.items()):
                hist = np.bincount(a.argmax(1), minlength=len(classes))
                ax.barh(range(len(classes)), hist, color="#4c72b0")
                ax.set_yticks(range(len(classes)), labels, fontsize=7)
                ax.invert_yaxis()
                ax.set_title(mpl_text(name), fontsize=9)
                ax.set_xlabel("images (argmax)", fontsize=8)
            fig.suptitle("Class histogram per teacher column (argmax over the unlabeled images)", fontsize=10)
            sec.figures.append(Figure("Class histogram per column", data_uri(_png(fig, prov)), prov))

            fig, axes = _small_multiples(len(arrays))
            bins = np.linspace(0, 1, 21)
            for ax, (name, a) in zip(axes, arrays.items()):
                conf = a.max(1)
                ax.hist(conf, bins=bins, color="#55a868")
                ax.axvline(1 / max(len(classes), 1), color="#c44e52", lw=1, ls="--")
                ax.set_title(mpl_text(f"{name} (mean {conf.mean():.3f})"), fontsize=9)
                ax.set_xlabel("max probability", fontsize=8)
            fig.suptitle("Confidence per teacher column (dashed: 1 / classes, a uniform guess)", fontsize=10)
            sec.figures.append(Figure("Confidence histogram per column", data_uri(_png(fig, prov)), prov))

            names, m = agreement_matrix(arrays)
            k = len(names)
            fig, ax = plt.subplots(figsize=(0.8 * k + 2.5, 0.7 * k + 1.5))
            im = ax.imshow(m, cmap="viridis", vmin=0, vmax=1)
            ax.set_xticks(range(k), [mpl_text(n) for n in names], rotation=45, ha="right", fontsize=8)
            ax.set_yticks(range(k), [mpl_text(n) for n in names], fontsize=8)
            for i in range(k):
                for j in range(k):
                    ax.text(j, i, f"{m[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="black" if m[i, j] > 0.6 else "white")
            ax.set_title("Agreement: share of images where two columns' argmax match (no labels)", fontsize=9)
            fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
            sec.figures.append(Figure("Agreement matrix between columns", data_uri(_png(fig, prov)), prov))
    if p.prior.is_file():
        pr = read_json(p.prior)
        sec.facts.append(("class prior", f"{pr.get('mode')} (asked: {pr.get('requested')}): {pr.get('why', '')}"))
        rows_pr = []
        matched = {t: read_stamp(p.teacher, f"teacher-{t}").get("prior_match") or {}
                   for t in ("clip",) if stamp_path(p.teacher, f"teacher-{t}").is_file()}
        zs = matched.get("clip", {}).get("clip") or {}
        for i, name in enumerate(classes):
            share = pr["prior"][i] if pr.get("prior") else None
            rows_pr.append([name, _fmt(share, 3) if share is not None else "-",
                            str(zs["counts_uncorrected"][i]) if zs else "-", str(zs["counts"][i]) if zs else "-"])
        sec.tables.append({"title": "Class prior: the shares every column is matched to, and the zero-shot CLIP "
                                    "column's argmax counts before and after",
                           "head": ["class", "prior share", "clip before", "clip after"], "rows": rows_pr,
                           "note": "teacher/prior.json; each column's own counts before/after are in its stamp "
                                   "(prior_match)"})
    st = read_stamp(p.teacher, "ensemble")
    if st:
        weights = st.get("weights") or {}
        det = st.get("weights_details") or {}
        est = det.get("estimated_accuracy") or {}
        ev_cols = read_json(p.teacher_eval).get("columns", {}) if p.teacher_eval.is_file() else {}
        head = ["column", "weight", "estimated accuracy (no labels)"] + (["top-1 on data.eval"] if ev_cols else [])
        all_cols = list(dict.fromkeys([*(det.get("columns") or []), *weights]))
        sec.tables.append({"title": "Ensemble weights", "head": head,
                           "rows": [[c, _fmt(float(weights.get(c, 0.0)), 4), _fmt(est.get(c), 3) if c in est else
                                     ("dropped" if c in (det.get("dropped") or {}) else "-"),
                                     *([_fmt((ev_cols.get(c) or {}).get("top1"))] if ev_cols else [])]
                                    for c in all_cols],
                           "note": f"why: {st.get('weights_why', '')}" +
                                   (f"; groups counted once: {det.get('groups')}" if det.get("groups") else "")})
        d = st.get("synthetic_dropped") or {}
        if d.get("threshold"):
            sec.facts.append(("synthetic images dropped",
                              f"{sum((d.get('dropped_per_class') or {}).values())} (fused probability of their "
                              f"class below {d['threshold']}); per class {d.get('dropped_per_class')}"))
        else:
            sec.facts.append(("synthetic images dropped", "none (teacher.ensemble.drop_synthetic_below: 0)"))
        if st.get("mean_confidence") is not None:
            sec.facts.append(("mean fused confidence / agreement",
                              f"{_fmt(st.get('mean_confidence'))} / {_fmt(st.get('mean_agreement'))}"))
    air = run.file_figure("AiR prototypes: the synthetic images closest to their class mean",
                          p.grid("air_prototypes"), run.prov("teacher/air", p.teacher, "teacher-air"))
    if air:
        sec.figures.append(air)
    if p.images_index.is_file():
        idx = read_table(p.images_index)
        skipped = [(r["path"], r["skipped"]) for r in idx if r.get("skipped")]
        sec.facts.append(("unlabeled files", f"{len(idx)} listed, {len(idx) - len(skipped)} readable, "
                                             f"{len(skipped)} skipped"))
        if skipped:
            sec.tables.append({"title": "Skipped inputs", "head": ["file", "why"],
                               "rows": [list(s) for s in skipped[:_SKIPPED_SHOWN]],
                               "note": (f"... and {len(skipped) - _SKIPPED_SHOWN} more (teacher/images.parquet)"
                                        if len(skipped) > _SKIPPED_SHOWN else "")})
    if p.teacher_eval.is_file():
        ev = read_json(p.teacher_eval)
        cols = ev.get("columns", {})
        sec.tables.append({
            "title": f"Top-1 on data.eval ({ev.get('images')} labeled images; evaluation only, never used to train)",
            "head": ["column", "top-1", "before the prior", *classes],
            "rows": [[c, _fmt(v.get("top1")), _fmt(v.get("top1_uncorrected")) if "top1_uncorrected" in v else "-",
                      *[_fmt((v.get("per_class") or {}).get(n), 2) for n in classes]]
                     for c, v in cols.items()]})
    return sec


def _student(run: _Run) -> Section | None:
    p = run.paths
    if not p.student_metrics.is_file():
        return None
    m = read_json(p.student_metrics)
    prov = run.prov("student", p.student, "student")
    sec = Section("student", "Student: what it learned", key=prov.key)
    cfg = read_json(p.student_config) if p.student_config.is_file() else {}
    hist = m.get("history") or []
    sec.facts += [
        ("model", f"{cfg.get('architecture', '?')} ({m.get('weights', 'final')} weights), "
                  f"{m.get('train_images')} training images, {m.get('epochs')} epochs on {m.get('device')}"),
        ("throughput", f"{_fmt(m.get('images_per_s'), 1)} images/s over {_fmt(m.get('wall_time_s'), 1)} s of training"),
        ("final train loss", _fmt(m.get("train_loss"))),
    ]
    if hist:
        plt = _plt()
        ep = [h["epoch"] for h in hist]
        acc = [h.get("eval_top1") for h in hist]
        has_acc = any(a is not None for a in acc)
        fig, axes = plt.subplots(1, 3 if has_acc else 2, figsize=(11 if has_acc else 7.5, 3), layout="constrained")
        axes[0].plot(ep, [h["loss"] for h in hist], marker="o")
        axes[0].set_title("training loss", fontsize=9)
        axes[0].set_xlabel("epoch")
        axes[1].plot(ep, [h.get("images_per_s") for h in hist], marker="o", color="#55a868")
        axes[1].set_title("images/s", fontsize=9)
        axes[1].set_xlabel("epoch")
        if has_acc:
            axes[2].plot(ep, [a if a is not None else np.nan for a in acc], marker="o", color="#c44e52")
            axes[2].set_ylim(0, 1)
            axes[2].set_title("top-1 on data.eval (evaluation only)", fontsize=9)
            axes[2].set_xlabel("epoch")
        for ax in axes:
            ax.xaxis.get_major_locator().set_params(integer=True)
        sec.figures.append(Figure("Per epoch: loss, throughput" + (", accuracy" if has_acc else ""),
                                  data_uri(_png(fig, prov)), prov))
    ev = m.get("eval")
    if ev:
        names = list(ev.get("per_class", {})) or run.job.class_names
        sec.facts.append(("top-1 on data.eval", f"{_fmt(ev.get('top1'))} on {ev.get('images')} images "
                                                 "(evaluation only)"))
        if ev.get("top1_without_ema") is not None:
            sec.facts.append(("top-1 without EMA", _fmt(ev["top1_without_ema"])))
        if ev.get("confusion"):
            sec.figures.append(Figure("Confusion matrix on data.eval",
                                      data_uri(confusion_png(ev["confusion"], names, prov)),
                                      prov))
        sec.tables.append({"title": "Per-class accuracy on data.eval", "head": ["class", "images", "top-1"],
                           "rows": [[c, (ev.get("per_class_images") or {}).get(c, "–"),
                                     _fmt((ev.get("per_class") or {}).get(c))] for c in names]})
    else:
        sec.notes.append("No data.eval in the job: no accuracy (the student is trained on pseudo-labels only).")
    return sec


_ACCURACY_KEYS = ("top1", "eval_top1", "accuracy")


def _export(run: _Run) -> Section | None:
    p = run.paths
    if not p.export_report.is_file():
        return None
    r = read_json(p.export_report)
    prov = run.prov("export", p.export, "export")
    sec = Section("export", "Export: what the formats lost", key=prov.key)
    if prov.key is None:
        sec.notes.append("The export is not stamped done: a required format failed its gate (see below).")
    formats = r.get("formats", {})
    deploy = r.get("deploy") or {}
    timings = deploy.get("timings_ms") or {}
    speed = deploy.get("speed_vs_fp32") or {}
    student_top1 = None
    if p.student_metrics.is_file():
        student_top1 = (read_json(p.student_metrics).get("eval") or {}).get("top1")
    rows = []
    for f, e in formats.items():
        acc = next((e[k] for k in _ACCURACY_KEYS if e.get(k) is not None), None)
        if e.get("passed"):
            verdict = "passed"
        elif e.get("built") is False:
            why = e.get("reason") or e.get("error")
            verdict = "not built" + (f": {why}" if why else "")
        else:
            verdict = "FAILED"
        gate = f"≥ {_fmt(e.get('min_agreement'), 3)}" + (" (required)" if e.get("required") else "")
        size = e.get("file_size")
        rows.append([f + (" ← deployed" if deploy.get("format") == f else ""), e.get("path") and Path(e["path"]).name,
                     _fmt(e.get("agreement")), _fmt(e.get("max_abs_diff"), 6), _fmt(acc),
                     _fmt(timings.get(f), 3), _fmt(speed.get(f), 2),
                     f"{size / 1e6:.2f} MB" if size else "–", gate, verdict])
    sec.tables.append({
        "title": "The ladder",
        "head": ["format", "file", "top-1 agreement with PyTorch", "max |Δlogit|", "top-1 on data.eval",
                 "latency ms/image", "speed vs fp32", "size", "gate", "verdict"],
        "rows": rows,
        "note": (f"Agreement and Δlogit on {next(iter(formats.values()), {}).get('n_images', '?')} held-aside real "
                 f"images (parity source: {r.get('parity_source', '?')}); latency: onnxruntime "
                 f"{deploy.get('provider', '')}, batch {deploy.get('batch', '?')}, {deploy.get('machine', '')}."
                 + (f" The PyTorch student's top-1 on data.eval is {_fmt(student_top1)}; per-format accuracy is "
                    "not measured by the export." if student_top1 is not None and not any(
                        any(e.get(k) is not None for k in _ACCURACY_KEYS) for e in formats.values()) else ""))})
    if deploy:
        sec.facts.append(("deployed", f"{deploy.get('format')} ({deploy.get('file')})"))
        sec.facts.append(("why", str(deploy.get("why", ""))))
    else:
        sec.facts.append(("deployed", "nothing: no format passed its gate"))
    q = (r.get("int8_quantization") or {}).get("qat")
    if q and q.get("epochs") is None:  # skipped or failed before training: say why, not a row of Nones
        sec.facts.append(("INT8 quantisation-aware fine-tuning",
                          "not used: " + str(q.get("why") or q.get("reason") or q.get("error") or "no reason recorded")
                          + "; the post-training INT8 model is the one gated"))
    elif q:
        used = "the QAT model" if q.get("used") else "the post-training model"
        extra = q.get("reason") or q.get("error")
        sec.facts.append(("INT8 quantisation-aware fine-tuning",
                          f"{q.get('epochs')} epoch(s) × {q.get('images')} images; agreement with the student on "
                          f"{q.get('choice_images')} {q.get('choice_set', '')}: {q.get('choice_agreement')}; kept "
                          f"{used}" + (f" ({extra})" if extra else "")))
    trt = r.get("tensorrt") or {}
    if trt and not trt.get("built"):
        sec.facts.append(("TensorRT", f"not built: {trt.get('reason', '')}"))
    sec.code = runtime_snippet(p.export)
    return sec


_BUILDERS = {"synthesis": _synthesis, "teachers": _teachers, "student": _student, "export": _export}


def _sources(paths: RunPaths, sid: str) -> list[Path]:
    """The run-folder files a section is drawn from (its reuse key covers their size and mtime)."""
    from .rundir import stamp_path

    p = paths
    if sid == "synthesis":
        return [p.lora_loss, stamp_path(p.lora, "lora"), p.synthetic, stamp_path(p.teacher, "synth"),
                *sorted(p.grids.glob("*.png"))]
    if sid == "teachers":
        return [p.pseudo_labels, p.images_index, p.teacher_eval, stamp_path(p.teacher, "ensemble"),
                stamp_path(p.teacher, "teacher-air"), p.grid("air_prototypes"), p.prior,
                stamp_path(p.teacher, "teacher-clip")]
    if sid == "student":
        return [p.student_metrics, p.student_config, stamp_path(p.student, "student")]
    return [p.export_report, stamp_path(p.export, "export"), p.student_metrics]


def _code_version() -> str:
    from .rundir import sha256_bytes

    here = Path(__file__).parent
    parts = [Path(__file__).read_bytes(), *(f.read_bytes() for f in sorted((here / "templates").glob("*.j2")))]
    return sha256_bytes(b"\0".join(parts))


def _source_key(job, paths: RunPaths, sid: str, version: str) -> str:
    from .rundir import settings_hash

    files = []
    for f in _sources(paths, sid):
        try:
            st = f.stat()
            files.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            files.append((str(f), None, None))
    return settings_hash(version, job.to_dict(), os.getcwd(), sid, files)


_SECTION_RE = None


def _previous_sections(path: Path) -> dict[str, tuple[str, str]]:
    """``{section id: (source key, html)}`` from the page already on disk."""
    import re

    global _SECTION_RE
    if _SECTION_RE is None:
        _SECTION_RE = re.compile(r'<section id="(\w+)" class="stage" data-src="([0-9a-f]{64})">.*?</section>', re.S)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return {}
    return {m.group(1): (m.group(2), m.group(0)) for m in _SECTION_RE.finditer(text)}


def _env():
    import jinja2

    return jinja2.Environment(loader=jinja2.PackageLoader("distillery", "templates"), autoescape=True,
                              undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
                              keep_trailing_newline=True)


def render(job, reuse: dict[str, tuple[str, str]] | None = None) -> str:
    """The page. A section whose source key matches one in ``reuse`` (from the page on disk) is taken as it
    was: nothing it shows has changed, so its figures are not drawn again."""
    from markupsafe import Markup

    env = _env()
    run = _Run(job)
    version = _code_version()
    section_tpl = env.get_template("section.html.j2")
    rendered, ran = [], []
    for sid, build in _BUILDERS.items():
        src = _source_key(job, run.paths, sid, version)
        old = (reuse or {}).get(sid)
        if old is not None and old[0] == src:
            html = old[1]
        else:
            sec = build(run)
            if sec is None:
                continue
            html = section_tpl.render(s=sec, src=src, job=job).strip()
        rendered.append(Markup(html))
        ran.append(sid)
    job_file = job.source or ""
    missing = [(sid, f"distillery {'teacher' if sid in ('synthesis', 'teachers') else sid} --job {job_file or 'JOB'}")
               for sid in SECTIONS if sid not in ran]
    return env.get_template(TEMPLATE).render(job=job, rendered=rendered, ran=ran, missing=missing,
                                             job_file=job_file, classes=job.class_names, summary=summary(job))


def summary(job) -> dict:
    """The page's first screen: what ran, the headline figures, and the label-free warning signs
    (distillery/health.py)."""
    from .health import check_run

    p = RunPaths(job.run_path)
    figures: list[tuple[str, str]] = []
    if p.pseudo_labels.is_file():
        st = read_stamp(p.teacher, "ensemble")
        figures.append(("pseudo-labeled images", f"{st.get('real', '?')} real + {st.get('synthetic', '?')} synthetic"))
        if p.teacher_eval.is_file():
            ens = (read_json(p.teacher_eval).get("columns") or {}).get("ensemble") or {}
            if ens.get("top1") is not None:
                figures.append(("ensemble top-1 on data.eval", f"{ens['top1']:.4f}"))
    if p.student_metrics.is_file():
        m = read_json(p.student_metrics)
        ev = (m.get("eval") or {}).get("top1")
        figures.append(("student", f"{m.get('epochs')} epochs" + (f", top-1 on data.eval {ev:.4f}" if ev is not None
                                                                   else "")))
    if p.export_report.is_file():
        r = read_json(p.export_report)
        d = r.get("deploy") or {}
        fmt, why = d.get("format") or "-", d.get("why", "")
        why = why[len(fmt) + 1:].strip() if why.startswith(f"{fmt}:") else why  # the reason may name it already
        figures.append(("deployed format", f"{fmt} ({why})" if d else "none"))
    bundle = p.root / "bundle" / "bundle.json"
    if bundle.is_file():
        try:
            b, g = read_json(bundle), read_json(bundle.parent / "golden.json")
            figures.append(("bundle", f"{bundle.parent} ({b.get('deploy', {}).get('format')}, {b.get('wheel')}, "
                                      f"smoke test on {len(g.get('images', []))} golden images)"))
        except (OSError, ValueError):
            figures.append(("bundle", f"{bundle.parent} (unreadable bundle.json or golden.json)"))
    try:
        findings = check_run(job)
    except Exception as e:  # noqa: BLE001 - the summary never breaks the page
        findings = [{"stage": "report", "level": "note", "code": "health", "message": f"health checks failed: {e}"}]
    findings.sort(key=lambda f: f["level"] != "warning")
    return {"figures": figures, "findings": findings}


def build_report(job, reuse: bool = True) -> Path:
    """Write ``runs/<job>/report.html`` from the run folder (left untouched when nothing changed). With
    ``reuse``, sections whose files are unchanged since the page on disk was written are kept as they are."""
    paths = RunPaths(job.run_path)
    html = render(job, _previous_sections(paths.report_html) if reuse else None)
    write_bytes(paths.report_html, html.encode("utf-8"))
    return paths.report_html


def refresh_report(job) -> Path | None:
    """:func:`build_report` for the end of a stage: a failure is one log line, never the stage's failure."""
    try:
        return build_report(job)
    except Exception as e:  # noqa: BLE001 - the report must never fail a stage
        log(f"report: not refreshed ({type(e).__name__}: {e}); `distillery report --job FILE` retries.")
        return None
