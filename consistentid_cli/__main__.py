"""``python -m consistentid_cli {doctor,run,selftest} ...``: the command line (see ``docs/CLI.md``)."""

from __future__ import annotations

import argparse
import sys

from . import doctor, runner
from .selftest import command as selftest_command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m consistentid_cli", description="ComfyUI-ConsistentID command line tools.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="{doctor,run,selftest}")
    doctor_parser = commands.add_parser(
        "doctor", help="check the install and every model file; says exactly what to fix",
        description="Check Python, torch, ComfyUI, ONNX Runtime, InsightFace and every ConsistentID model file. "
                    "Exit code 1 when something blocks generation.",
    )
    doctor.add_arguments(doctor_parser)
    doctor_parser.set_defaults(handler=doctor.main)
    run_parser = commands.add_parser(
        "run", help="run an API-format workflow without the web server and save its images",
        description="Run an API-format workflow (ComfyUI: Workflow > Export (API)) through ComfyUI's executor.",
    )
    runner.add_arguments(run_parser)
    run_parser.set_defaults(handler=runner.main)
    selftest_parser = commands.add_parser(
        "selftest", help="run the example workflows on tiny models through your ComfyUI: does the install work?",
        description="Build tiny random models in the release formats in a temporary folder and run the example "
                    "workflows through your ComfyUI on the CPU. Nothing is downloaded or written into ComfyUI's "
                    "folders. Exit code 1 when a workflow fails.",
    )
    selftest_command.add_arguments(selftest_parser)
    selftest_parser.set_defaults(handler=selftest_command.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
