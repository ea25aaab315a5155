"""The ``distillery`` command line.

    distillery teacher --job examples/eurosat-tiny.yaml            # synthetic set, pseudo-labels, manifest
    distillery student --job examples/eurosat-tiny.yaml student.epochs=5
    distillery student --job examples/eurosat-tiny.yaml --nproc 2  # two processes (torchrun, DDP)
    distillery export  --job examples/eurosat-tiny.yaml
    distillery run runs/eurosat-tiny/export image.jpg            # classify images (runtime only, no torch)
    distillery bundle --job examples/eurosat-tiny.yaml             # runs/<job>/bundle/: model, wheel, smoke test
    distillery tiny-models --out models/tiny                       # build the offline demo models
    distillery standin --out models/standin                        # stand-in models (reads LABELED images)
    distillery report --job examples/eurosat-tiny.yaml             # runs/<job>/report.html (also after each stage)
    distillery init --classes "cat,dog" --unlabeled DIR --out job.yaml   # a job file for your own images

Heavy libraries are imported inside the commands, so ``distillery run`` stays torch-free.
"""
from __future__ import annotations

import argparse
import sys

EPILOG = """\
stages and their files (runs/<job>/ ...):
  teacher   teacher/synthetic.parquet, teacher/pseudo_labels.parquet, teacher/manifest.parquet
  student   student/model.safetensors, config.json, metrics.json, report.md (+ confusion.png)
  export    export/model.onnx, report.json
  bundle    bundle/: model, runtime wheel, requirements, app.py, smoke_test.py, golden.json, README.md
  report    report.html: every stage that ran on one self-contained page (refreshed after each stage)
Each stage reads only the previous stages' files, skips itself when its inputs and settings are
unchanged, and resumes after an interruption. Override any job setting with key=value, e.g.
  distillery student --job examples/eurosat-tiny.yaml student.epochs=5 student.model=resnet18
Models: every role (models.diffusion, models.clip, models.captioner, models.expert) is a hub id or a
local folder. Without internet, set HF_HUB_OFFLINE=1 and point roles at local folders.
"""


TEACHER_DESCRIPTION = """\
Run the teacher stages, in this order, each skipped when its inputs and settings are unchanged:
  lora        a LoRA on the diffusion UNet from the unlabeled images (teacher.lora; with synthesis on)
  synth       synthetic images per class with the bag-of-tricks prompts (teacher.synth; source: table uses a
              teacher/synthetic.parquet you place in the run folder)
  prior       the class prior every column is matched to (teacher.prior: estimated, uniform, given, none)
  clip        CLIP zero-shot (teacher.clip)
  air         AiR: prototypes from the synthetic images, fused with zero-shot, prompt learning (teacher.air)
  latte       LaTTe-CLIP: captioner descriptions and prototype fine-tuning of CLIP (teacher.latte)
  vermouth    a classifier on diffusion-UNet (or expert) features of the synthetic images (teacher.vermouth)
  transduct   TransCLIP-style refinement of zero-shot by the unlabeled pool's own structure (teacher.transduct)
  ensemble    soft labels for every real image, each column weighted by its accuracy estimated without labels
              (teacher.ensemble), written to teacher/manifest.parquet
With data.eval set, each column's top-1 on it goes to teacher/eval.json (evaluation only). Enable or disable a
teacher with teacher.<name>.enabled=true|false; --dry-run estimates the time first."""


def _stage_parser(sub, name: str, help_: str, description: str):
    p = sub.add_parser(name, help=help_, description=description, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--job", required=True, metavar="FILE", help="job file (YAML), e.g. examples/eurosat-tiny.yaml")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="override job settings, e.g. teacher.synth.images_per_class=8 student.epochs=3")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars (logs stay)")
    if name in ("teacher", "student", "export"):
        p.add_argument("--no-report", action="store_true",
                       help="do not refresh runs/<job>/report.html at the end (`distillery report` builds it)")
        p.add_argument("--force", action="store_true",
                       help=f"run the {name} stage again from the start even if it is up to date: its stamps and "
                            "checkpoints are removed first (content-keyed caches such as image features stay)")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distillery",
        description="Turn class names + a folder of unlabeled images into a small classifier for the edge: "
                    "foundation-model teachers label the images, a timm student learns from them, and the "
                    "student is exported to ONNX for a torch-free runtime.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    tp = _stage_parser(sub, "teacher", "generate synthetic images, pseudo-label the real ones, write the manifest",
                       TEACHER_DESCRIPTION)
    tp.add_argument("--dry-run", action="store_true",
                    help="print per stage the images, UNet evaluations and an estimated time (from a short timed "
                         "calibration run) without writing the run folder")
    sp = _stage_parser(sub, "student", "train the timm student on the manifest",
                       "Train the student (a timm model) on teacher/manifest.parquet; evaluates on data.eval when set.")
    sp.add_argument("--nproc", type=int, default=1, metavar="N",
                    help="train in N processes with torchrun and DistributedDataParallel (gloo on CPU, NCCL on "
                         "CUDA); the global batch stays student.batch_size, split over the processes (default 1)")
    _stage_parser(sub, "export", "export the student to ONNX and check parity",
                  "Export the student to ONNX with its preprocessing and class names in the metadata, and check "
                  "parity against PyTorch on real domain images. With int8 in export.formats the INT8 model is "
                  "also fine-tuned under simulated quantisation (export.int8_qat_epochs, default 4; 0 = plain "
                  "post-training quantisation), e.g. export.formats=[fp32,int8] as an override.")
    bp = _stage_parser(sub, "bundle", "write runs/<job>/bundle/: what a device needs to run the exported model",
                       "Write runs/<job>/bundle/: the deployed model and export report, the runtime as a pure-Python "
                       "wheel, requirements for x86 and JetPack, an example app, a smoke test with golden "
                       "predictions on a few real images, and a README for the device.")
    bp.add_argument("--images", type=_positive_int, default=8, metavar="N",
                    help="real images for the smoke test, class-balanced by pseudo-label (default 8)")
    _stage_parser(sub, "report", "write runs/<job>/report.html from the run folder",
                  "Write the run report: one self-contained HTML page (images embedded, no network) with a "
                  "section per stage that ran. Every stage command refreshes it at its end.")
    from .init import add_arguments as add_init_arguments

    add_init_arguments(sub.add_parser(
        "init", help="write a job file for your own class names and image folders",
        description="Write a commented job file for your class names and folders. Model roles point at the tiny "
                    "offline models by absolute path (built if missing), or at the real hub models with --real, "
                    "so the job runs from any folder.",
        formatter_class=argparse.RawDescriptionHelpFormatter))
    from distillery.runtime.cli import add_arguments as add_run_arguments

    add_run_arguments(sub.add_parser(
        "run", help="classify images with an exported model (runtime only)",
        description="Classify images with an exported model. Needs only numpy, Pillow and onnxruntime."))
    from distillery.runtime.evaluate import add_arguments as add_eval_arguments

    add_eval_arguments(sub.add_parser(
        "eval", help="measure an exported model on a labeled folder (top-1, per-class recall, confusion)",
        description="Measure an exported model on a labeled folder (one sub-folder per class): top-1, per-class "
                    "recall, the confusion matrix and the most confident mistakes; --json for the figures. Needs only "
                    "numpy, Pillow and onnxruntime."))
    t = sub.add_parser("tiny-models", help="build the tiny random models the offline demo job uses",
                       description="Build tiny, seeded, random-initialised models for every role (diffusers, "
                                   "transformers, open_clip, timm classes) into a local folder, once.")
    t.add_argument("--out", default="models/tiny", help="output folder (default models/tiny)")
    t.add_argument("--force", action="store_true", help="rebuild even if present")
    from .standin import add_arguments as add_standin_arguments

    add_standin_arguments(sub)
    return parser


def _load(args):
    from .job import load_job

    return load_job(args.job, args.overrides)


def _roles_for(job, stage: str) -> dict[str, str]:
    """The model references (role or key -> reference) the stage will load."""
    if stage == "teacher":
        from distillery.teacher import model_roles

        return model_roles(job)
    if stage == "student" and job.student.pretrained:
        return {"student.pretrained": job.student.pretrained}
    return {}


def _refs_for(job, stage: str) -> list[str]:
    return list(dict.fromkeys(_roles_for(job, stage).values()))


def _run_stage(command: str, job, progress: bool) -> None:
    if command == "teacher":
        from distillery.teacher import run_teacher

        run_teacher(job, progress=progress)
    elif command == "student":
        from distillery.student import train_student

        train_student(job, progress=progress)
    elif command == "export":
        from distillery.export import export_onnx

        export_onnx(job, progress=progress)


def _print_health(job, stage: str) -> None:
    """The stage's label-free warning signs (distillery/health.py), on stderr at its end; never a failure."""
    try:
        from .health import check_run, format_findings

        findings = check_run(job, (stage,))
    except Exception as e:  # noqa: BLE001 - health checks must never fail a stage
        print(f"health checks not run ({type(e).__name__}: {e})", file=sys.stderr)
        return
    if findings:
        print(f"{stage}: {len(findings)} thing(s) to check before trusting this run:\n" + format_findings(findings),
              file=sys.stderr)


def _refresh_report(args, job) -> None:
    """Rebuild runs/<job>/report.html after a stage; a failure here is one log line, never the stage's."""
    if getattr(args, "no_report", False):
        return
    try:
        from .report import refresh_report
    except Exception as e:  # e.g. jinja2/matplotlib missing from an install without the core extra
        from .rundir import log

        log(f"report: not refreshed ({type(e).__name__}: {e}).")
        return
    path = refresh_report(job)
    if path is not None:
        from .rundir import log

        log(f"report: {path}")


def _positive_int(text: str) -> int:
    """argparse type: a whole number >= 1 (a smoke test with no golden image would pass without checking anything)."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {n} (the smoke test needs images)")
    return n


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    if args.command == "run":
        from distillery.runtime.cli import run as run_images

        return run_images(args)
    if args.command == "eval":
        from distillery.runtime.evaluate import run as run_eval

        return run_eval(args)
    try:
        if args.command == "init":
            from .init import run as run_init

            return run_init(args)
        if args.command == "tiny-models":
            from .tiny import build_tiny_models

            for role, path in build_tiny_models(args.out, force=args.force).items():
                print(f"{role}\t{path}")
            return 0
        if args.command == "standin":
            from .standin import run_cli

            return run_cli(args)
        job = _load(args)
        if args.command == "report":
            from .report import build_report

            print(build_report(job))
            return 0
        from .models import check_local_models, prepare_hub_access

        check_local_models(_roles_for(job, args.command))  # a model path that points nowhere: before any work
        prepare_hub_access(_refs_for(job, args.command))
        nproc = getattr(args, "nproc", 1)
        if args.command == "student":
            from distillery.student.dist import check_nproc

            warning = check_nproc(nproc)
            if job.student.batch_size < 2 * nproc:
                raise ValueError(f"student.batch_size={job.student.batch_size} with --nproc {nproc}: each process "
                                 f"needs at least 2 images per step; set student.batch_size >= {2 * nproc} or use "
                                 "fewer processes.")
            if warning:
                from .rundir import log

                log(warning)
        progress = not args.no_progress
        if not progress:  # also the Hugging Face libraries' own loading bars
            import os

            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        if args.command == "teacher" and args.dry_run:
            from distillery.teacher import dry_run

            dry_run(job)
            return 0
        from .rundir import run_lock

        with run_lock(job.run_path, "distillery " + " ".join(argv)):  # one stage at a time per run folder
            from .rundir import clean_temp_files

            clean_temp_files(job.run_path, recursive=True)  # half-written files of a killed run (we hold the folder)
            if getattr(args, "force", False):
                from .rundir import forget_stage, log

                gone = forget_stage(job.run_path, args.command)
                log(f"{args.command}: --force: removed {len(gone)} stamp/checkpoint file(s)" +
                    (f" ({', '.join(gone[:6])}{', ...' if len(gone) > 6 else ''})" if gone else "") +
                    "; running it from the start")
            if args.command == "bundle":
                from .bundle import make_bundle

                make_bundle(job, n_images=args.images, progress=progress)
                _refresh_report(args, job)  # its summary names the bundle
                return 0
            if args.command == "student" and nproc > 1:
                from distillery.student.dist import launch

                rc = launch(args.job, args.overrides, nproc, progress)
                _refresh_report(args, job)
                if rc != 0:
                    print(f"error: the student stage failed in one of its {nproc} processes (torchrun exit code "
                          f"{rc}; see the log above); rerun the same command to resume.", file=sys.stderr)
                return 0 if rc == 0 else 1
            try:
                _run_stage(args.command, job, progress)
            except KeyboardInterrupt:
                raise
            except Exception:  # what a failed stage left (e.g. an export gate's verdicts) is worth seeing too
                _refresh_report(args, job)
                raise
            _refresh_report(args, job)
            _print_health(job, args.command)
        return 0
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to pick up where it stopped", file=sys.stderr)
        return 130
    except Exception as e:  # user-facing errors: one clear line, no traceback unless asked
        from .job import JobError
        from .models import ModelLoadError
        from .rundir import RunLockError

        known = (JobError, ModelLoadError, RunLockError, ValueError, FileNotFoundError)
        if isinstance(e, known) or type(e).__name__.endswith("GateError"):
            print(f"error: {e}", file=sys.stderr)
            return 1 if type(e).__name__.endswith("GateError") else 2
        raise


if __name__ == "__main__":
    sys.exit(main())
