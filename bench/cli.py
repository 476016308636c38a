"""``python -m bench [step|face|memory|scaling|soak ...] [--smoke] [--comfyui PATH] [--json PATH]``.

Runs the selected benchmarks (all by default) in one process, prints each table as it finishes and
the whole report at the end, and writes everything (raw samples included) as JSON.
"""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
import time
from pathlib import Path

from bench.report import Section, format_report, load_average, machine_info, to_json, write_json

BENCHMARKS = ("step", "face", "memory", "scaling", "training", "soak")
DEFAULT_JSON = str(Path(__file__).resolve().parent / "results" / "latest.json")

# glibc keeps freed memory instead of returning it to the OS (and faulting it in again) on every
# large allocation; without this, step times on CPU swing by page faults (design.md §8).
MALLOC_TUNING = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_TOP_PAD_": "1073741824",
    "MALLOC_MMAP_THRESHOLD_": "33554432",
    "MALLOC_TRIM_THRESHOLD_": "17179869184",
}
_REEXEC_FLAG = "CONSISTENTID_BENCH_REEXEC"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("benchmarks", nargs="*", choices=[*BENCHMARKS, []], metavar="BENCHMARK",
                        help=f"which to run: {', '.join(BENCHMARKS)} (default: all)")
    parser.add_argument("--smoke", action="store_true", help="tiny models and 2 rounds (CI: keeps the scripts working)")
    parser.add_argument("--comfyui", metavar="PATH", help="ComfyUI checkout (default: $COMFYUI_PATH)")
    parser.add_argument("--json", metavar="PATH", default=DEFAULT_JSON, help=f"results file (default: {DEFAULT_JSON})")
    parser.add_argument("--rounds", type=int, metavar="N", help="timed rounds per comparison (default: per size)")
    parser.add_argument("--px", type=int, nargs="+", metavar="PX",
                        help="only these SD1.5 step/scaling resolutions, e.g. --px 256 (default: all of the size's)")
    parser.add_argument("--no-malloc-tuning", action="store_true",
                        help="keep glibc's default allocator settings (timings get noisier)")
    args = parser.parse_args(argv)
    args.benchmarks = list(dict.fromkeys(args.benchmarks or BENCHMARKS))
    return args


def reexec_with_malloc_tuning(argv: list[str]) -> None:
    """Restart this process once with :data:`MALLOC_TUNING` (glibc reads it only at start-up)."""
    if os.environ.get(_REEXEC_FLAG) or all(os.environ.get(k) == v for k, v in MALLOC_TUNING.items()):
        return
    env = {**os.environ, **MALLOC_TUNING, _REEXEC_FLAG: "1"}
    sys.stdout.flush()
    os.execve(sys.executable, [sys.executable, "-m", "bench", *argv], env)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if not args.no_malloc_tuning:
        reexec_with_malloc_tuning(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    started = time.perf_counter()

    from bench import comfy_env
    from bench.models import FULL, SMOKE

    try:
        comfy = comfy_env.start(args.comfyui)
    except comfy_env.ComfyUINotFound as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    import torch

    try:
        sizes = (SMOKE if args.smoke else FULL).with_rounds(args.rounds).at_resolutions(args.px)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    load_at_start = load_average()
    progress = lambda message: print(message, flush=True)  # noqa: E731
    progress(f"ConsistentID benchmarks ({sizes.name} sizes): {', '.join(args.benchmarks)}; "
             f"torch {torch.__version__}, {torch.get_num_threads()} threads")

    sections: list[Section] = []

    def done(new: list[Section]) -> None:
        for section in new:
            for target in section.targets:
                target.evaluated = not args.smoke
        sections.extend(new)
        print("\n" + format_report(new), flush=True)

    wanted = args.benchmarks
    if "step" in wanted or "scaling" in wanted:
        from bench import step, step_tables

        progress("[step] building models")
        rig = step.StepRig.build(comfy, sizes, progress)
        if "step" in wanted:
            done([step_tables.step_section(rig, progress)])
        if "scaling" in wanted:
            done([step_tables.resolution_section(rig, progress), step_tables.identity_section(rig, progress)])
        del rig
        comfy.model_management.unload_all_models()
        gc.collect()
        if "step" in wanted and sizes.sdxl_unet is not None:
            progress("[step] building the SDXL pair")
            pair = step.SDXLPair.build(comfy, sizes, progress)
            done([step_tables.sdxl_step_section(pair, progress)])
            del pair
            comfy.model_management.unload_all_models()
            gc.collect()
    if "face" in wanted:
        from bench import face

        progress("[face] building models")
        done(face.run(comfy, sizes, progress))
    if "training" in wanted:
        from bench import training

        progress("[training] building models and the feature cache")
        done(training.run(comfy, sizes, progress))
        comfy.model_management.unload_all_models()
        gc.collect()
    if "memory" in wanted:
        from bench import memory

        progress("[memory] fresh subprocesses")
        done(memory.run(sizes, comfy.root, progress))
    if "soak" in wanted:
        from bench import soak

        done(soak.run(comfy, sizes, progress))

    wall = time.perf_counter() - started
    meta = machine_info({
        "torch": torch.__version__, "threads": torch.get_num_threads(), "sizes": sizes.name,
        "benchmarks": wanted, "comfyui": str(comfy.root), "wall_seconds": wall,
        "malloc_tuning": {k: os.environ.get(k) for k in MALLOC_TUNING},
        "load_average_1min": {"start": load_at_start, "end": load_average()},
    })
    write_json(args.json, to_json(sections, meta))
    print("\n# Results\n\n" + format_report(sections, wall), flush=True)
    print(f"1-minute load average: {load_at_start:.1f} at start, {load_average():.1f} at the end "
          f"({os.cpu_count()} CPUs)")
    print(f"JSON: {Path(args.json).resolve()}")
    return 0
