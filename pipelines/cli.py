"""The `distillery` command line (also `python -m pipelines`): one subcommand per stage, plus config,
student and demo tools. Stages are imported lazily so `config validate` needs neither Ray nor torch."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from pipelines.config import ConfigError, dump_config, load_config
from pipelines.run import STAGE_MODULES


def _stage(name: str):
    return importlib.import_module(STAGE_MODULES[name])


def cmd_config(args: argparse.Namespace) -> int:
    cfg = load_config(args.file, args.set)
    if args.action == "validate":
        print(f"{args.file}: ok (stages: {', '.join(cfg.stages)})")
    else:
        print(dump_config(cfg), end="")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.set)
    if getattr(args, "write_config", None):
        from serving.app import write_serve_config

        print(f"wrote {write_serve_config(cfg, args.write_config)} (for `serve deploy` or a RayService)")
        return 0
    from pipelines.run import preflight

    preflight(cfg, [args.command])
    result = _stage(args.command).run(cfg)
    print(json.dumps(result, indent=2, default=str))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pipelines.run import run_all

    cfg = load_config(args.config, args.set)
    print(json.dumps(run_all(cfg), indent=2, default=str))
    return 0


def cmd_student(args: argparse.Namespace) -> int:
    from pipelines import student_cli

    return student_cli.main(args)


def cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import main as demo_main

    return demo_main(args)


def build_parser() -> argparse.ArgumentParser:
    from importlib.metadata import PackageNotFoundError, version

    try:
        ver = version("diffusion-distillery")
    except PackageNotFoundError:  # a checkout run as `python -m pipelines` without an install
        ver = "unknown (not installed)"
    p = argparse.ArgumentParser(prog="distillery", description="Distill Stable Diffusion students on Ray.",
                                epilog="exit status: 0 done, 1 a stage failed, 2 a bad command line or config")
    p.add_argument("-v", "--verbose", action="store_true")
    p.add_argument("--version", action="version", version=f"distillery {ver}")
    sub = p.add_subparsers(dest="command", required=True)

    def with_overrides(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config field, e.g. --set distill.max_steps=10")

    c = sub.add_parser("config", help="validate or show a config with its defaults filled in",
                       description="Validate a config, or show it with every default filled in.")
    c.add_argument("action", choices=["validate", "show"])
    c.add_argument("file")
    with_overrides(c)
    c.set_defaults(func=cmd_config)

    for name, text in [
        ("prepare", "read images+captions, preprocess, cache the teacher's embeddings"),
        ("distill", "distill the student with Ray Train + DeepSpeed"),
        ("steps", "step-distill a few-step student (guided, progressive, consistency, adversarial, dmd)"),
        ("tune", "search removal specs and loss weights with Ray Tune"),
        ("evaluate", "quality, fidelity, speed and size of the student against the teacher"),
        ("register", "register the student in MLflow, alias champion if it wins"),
        ("serve", "serve the registered student with Ray Serve (blocks)"),
    ]:
        sp = sub.add_parser(name, help=text, description=f"{text[0].upper()}{text[1:]}.")
        sp.add_argument("config")
        with_overrides(sp)
        if name == "serve":
            sp.add_argument("--write-config", metavar="FILE",
                            help="write the Serve config (serve deploy / RayService serveConfigV2) and exit")
        sp.set_defaults(func=cmd_stage)

    r = sub.add_parser("run", help="run the config's stages in order, skipping finished ones",
                       description="Run the config's stages in order, skipping the ones whose output is complete.")
    r.add_argument("config")
    with_overrides(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("student", help="student presets, building and publishing",
                       description="List the student presets, build a student folder from a teacher, or push one "
                                   "to the Hugging Face Hub.")
    ssub = s.add_subparsers(dest="action", required=True)
    sp = ssub.add_parser("presets", help="list presets with parameter counts and what they remove")
    sp.add_argument("--teacher", default=None, help="count on this teacher (default: SD 1.5 and SDXL configs)")
    sb = ssub.add_parser("build", help="build a student from a teacher and save a pipeline folder")
    sb.add_argument("--teacher", required=True)
    g = sb.add_mutually_exclusive_group(required=True)
    g.add_argument("--preset")
    g.add_argument("--spec", help="a YAML/JSON removal spec file")
    sb.add_argument("--out", required=True)
    sb.add_argument("--dtype", default="float32")
    sb.add_argument("--fp16-variant", action="store_true", help="also write *.fp16.safetensors of every component")
    sb.add_argument("--no-model-card", action="store_true", help="write no README.md model card")
    sh = ssub.add_parser("push", help="publish a student folder to the Hugging Face Hub",
                         description="Publish a student folder (model card included) as a Hub model repo, in one "
                                     "commit. The token comes from HF_TOKEN or `hf auth login`.")
    sh.add_argument("folder", help="a diffusers pipeline folder (distill.output, steps.output, student build --out)")
    sh.add_argument("--repo-id", required=True, help="owner/name on the Hub")
    sh.add_argument("--public", action="store_true", help="create the repo public (default: private)")
    sh.add_argument("--revision", default=None, help="branch to commit to (default: main)")
    sh.add_argument("--endpoint", default=None, help="a Hub endpoint (default: HF_ENDPOINT, else huggingface.co)")
    sh.add_argument("--message", default=None, help="the commit message")
    s.set_defaults(func=cmd_student)

    d = sub.add_parser("demo", help="the whole system on one machine: local Ray, S3 and MLflow",
                       description="The whole system on one machine: local Ray, S3 and MLflow servers, the shapes "
                                   "teacher distilled, evaluated, registered and served.")
    d.add_argument("--work-dir", default="./runs/demo")
    d.add_argument("--no-serve", action="store_true", help="stop after registering")
    d.add_argument("--small", action="store_true", help="reduced sizes (tests)")
    d.add_argument("--port", type=int, default=8000)
    d.set_defaults(func=cmd_demo)
    return p


# exit codes: 2 for a bad command line or config (argparse's own code too), 1 for a run that failed
EXIT_USAGE, EXIT_FAILED = 2, 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ConfigError as err:
        print(str(err), file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_FAILED


def run(argv: Any = None) -> None:
    sys.exit(main(argv))
