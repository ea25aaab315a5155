"""The teacher's report: what was made, at a glance.

``teacher/grids/<trick>.png`` shows each trick's images (a row per class, a few samples each) so a user
can see whether the generator understood the domain; ``teacher/report.md`` links them with the domain
LoRA's figures (trainable share, loss) and the synthesis counts.
"""
from __future__ import annotations

import os
from pathlib import Path

from distillery.rundir import RunPaths, atomic_path, read_json, read_table


def image_grid(cells: list[list[str | os.PathLike]], labels: list[str], title: str = "", min_cell: int = 64,
               label_width: int = 160, pad: int = 2):
    """A PIL image: one row per label, the row's images left to right (upscaled to ``min_cell`` px if smaller)."""
    from PIL import Image, ImageDraw

    paths = [p for row in cells for p in row]
    size = min_cell
    if paths:
        with Image.open(paths[0]) as im:
            size = max(min_cell, im.width)
    cols = max([len(r) for r in cells] + [1])
    head = 16 if title else 0
    W = label_width + cols * (size + pad) + pad
    H = head + len(cells) * (size + pad) + pad
    grid = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((pad, 2), title, fill="black")
    for r, (row, label) in enumerate(zip(cells, labels)):
        y = head + pad + r * (size + pad)
        text = label if len(label) <= label_width // 6 else label[: label_width // 6 - 1] + "…"
        draw.text((pad, y + size // 2 - 6), text, fill="black")
        for c, p in enumerate(row):
            with Image.open(p) as im:
                im = im.convert("RGB").resize((size, size), Image.NEAREST)  # nearest: show the real pixels
                grid.paste(im, (label_width + pad + c * (size + pad), y))
    return grid


def write_report(job, images=None) -> Path:
    """``teacher/report.md``: grids per trick, the domain LoRA's figures, synthesis counts, the unlabeled images
    left out, each teacher column's class histogram and confidence (and its top-1 on data.eval when set)."""
    paths = RunPaths(job.run_path)
    lines = [f"# Teacher report: {job.name}", ""]
    loss = paths.lora_loss
    if job.teacher.lora.enabled and loss.is_file():
        info = read_json(loss)
        lines += ["## Domain LoRA", "",
                  f"- caption {info['caption']!r}, {info['images']} unlabeled images, {info['steps']} steps at "
                  f"{info['resolution']} px on {info['device']} ({info['train_seconds']} s)",
                  f"- trainable {info['trainable_params']:,} of {info['unet_params']:,} UNet parameters "
                  f"({info['trainable_share']:.4%})",
                  f"- loss {info['loss_first_10pct']:.4f} (first 10% of steps) -> {info['loss_last_10pct']:.4f} "
                  "(last 10%)", f"- weights sha256 `{info['sha256']}`", ""]
    else:
        lines += ["## Domain LoRA", "", "- not used (teacher.lora.enabled=false or not trained)", ""]
    if paths.synthetic.is_file():
        rows = read_table(paths.synthetic)
        tricks = sorted({r["trick"] for r in rows})
        lines += ["## Synthetic images", "",
                  f"- {len(rows)} images, {len(job.classes)} classes, tricks {', '.join(tricks)}", ""]
        for t in tricks:
            g = paths.grid(t)
            if g.is_file():
                lines += [f"### {t}", "", f"![{t}]({g.relative_to(paths.teacher).as_posix()})", ""]
    if images is not None:
        lines += ["## Unlabeled images", "", f"- {len(images)} readable images in {images.source}",
                  f"- {len(images.skipped)} skipped" + (":" if images.skipped else ""), ""]
        lines += [f"  - `{p}`: {why}" for p, why in images.skipped[:200]]
        if len(images.skipped) > 200:
            lines.append(f"  - ... and {len(images.skipped) - 200} more (all in teacher/images.parquet)")
        lines.append("")
    if paths.prior.is_file():
        pr = read_json(paths.prior)
        lines += ["## Class prior", "", f"- {pr.get('mode')} (asked: {pr.get('requested')}): {pr.get('why', '')}"]
        if pr.get("prior"):
            lines.append("- shares: " + ", ".join(f"{c} {x:.3f}" for c, x in zip(job.class_names, pr["prior"])))
        lines.append("")
    lines += _column_lines(job, paths)
    dest = paths.teacher_report
    text = "\n".join(lines)
    if not (dest.is_file() and dest.read_text(encoding="utf-8") == text):  # an unchanged rerun touches nothing
        with atomic_path(dest) as tmp:
            tmp.write_text(text, encoding="utf-8")
    return dest


def _column_lines(job, paths: RunPaths) -> list[str]:
    """Label-free figures per teacher column (class histogram, mean confidence), and top-1 on data.eval."""
    import numpy as np

    if not paths.pseudo_labels.is_file():
        return []
    rows = read_table(paths.pseudo_labels)
    cols = [k[2:] for k in rows[0] if k.startswith("p_")] + ["soft_target"] if rows else []
    ev = read_json(paths.teacher_eval).get("columns", {}) if paths.teacher_eval.is_file() else {}
    lines = ["## Teacher columns", "", "| column | mean confidence | " + " | ".join(job.class_names) +
             " | top-1 on data.eval |", "|---|---:|" + "---:|" * len(job.class_names) + "---:|"]
    for c in cols:
        p = np.asarray([r[c if c == "soft_target" else f"p_{c}"] for r in rows])
        hist = np.bincount(p.argmax(1), minlength=len(job.class_names))
        name = "ensemble" if c == "soft_target" else c
        top1 = ev.get(name, {}).get("top1")
        lines.append(f"| {name} | {p.max(1).mean():.3f} | " + " | ".join(str(int(h)) for h in hist) +
                     f" | {'-' if top1 is None else f'{top1:.4f}'} |")
    lines.append("")
    top = {c: np.asarray([r[c if c == "soft_target" else f"p_{c}"] for r in rows]).argmax(1) for c in cols}
    names = ["ensemble" if c == "soft_target" else c for c in cols]
    lines += ["### Agreement between columns (share of images with the same argmax; no labels)", "",
              "| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for c, n in zip(cols, names):
        lines.append(f"| {n} | " + " | ".join(f"{(top[c] == top[d]).mean():.2f}" for d in cols) + " |")
    lines.append("")
    stamp = paths.teacher / ".ensemble.stamp.json"
    if stamp.is_file():
        st = read_json(stamp)
        lines += ["### Ensemble", "", f"- weights {st.get('weights')} ({st.get('weights_why', '')})"]
        det = st.get("weights_details") or {}
        if det.get("estimated_accuracy"):
            lines.append(f"- accuracy estimated without labels: {det['estimated_accuracy']}; groups counted once: "
                         f"{det.get('groups')}")
        if det.get("dropped"):
            lines.append(f"- dropped: {det['dropped']}")
        d = st.get("synthetic_dropped") or {}
        if d.get("threshold"):
            lines.append(f"- synthetic images dropped (fused probability of their class < {d['threshold']}): "
                         f"{d.get('dropped', 0)}; per class {d.get('dropped_per_class')}")
        lines.append("")
    protos = paths.teacher_dir("air") / "prototypes.parquet"
    if protos.is_file():
        grid = _prototype_grid(job, paths, read_table(protos))
        lines += ["### AiR prototypes (synthetic images closest to their class mean)", "",
                  f"![prototypes]({grid.relative_to(paths.teacher).as_posix()})", ""]
    return lines


def _prototype_grid(job, paths: RunPaths, rows: list[dict], per_class: int = 8) -> Path:
    cells = [[r["path"] for r in rows if r["class_index"] == c and r["rank"] < per_class]
             for c in range(len(job.classes))]
    dest = paths.grid("air_prototypes")
    import io

    from distillery.rundir import write_bytes

    buf = io.BytesIO()
    image_grid(cells, job.class_names, title="AiR prototypes").save(buf, format="PNG")
    write_bytes(dest, buf.getvalue())  # an unchanged rerun touches nothing
    return dest
