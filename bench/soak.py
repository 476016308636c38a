"""Soak: the SD1.5 example graph run many times inside one ComfyUI process, memory per run.

Each run changes the reference image, the identity weight and the adapter dtype (so the adapter
is loaded anew), executes the graph with ComfyUI's PromptExecutor, then does what ComfyUI's
"free memory" does (``/free`` with ``unload_models`` and ``free_memory``: unload every model,
reset the executor's caches, collect garbage, empty the device cache). After every run it records
the resident set size and how many objects of our classes, ModelPatchers and tensors are alive.
Nothing may outlive its graph: after the warm-up the RSS should stay flat (target: growth < 2 %)
and the object counts should not grow at all.

The RSS is read twice: as the process has it, then after glibc's ``malloc_trim(0)``
(:func:`bench.memory.trimmed_rss_bytes`). The first wanders by ±100 MiB between runs with nothing
alive, because glibc keeps freed heap pages for reuse; the second is the memory still allocated,
which is what a leak grows, so the target applies to it. Both are reported. Trimming happens after
the first reading of each run and is not something ComfyUI does: it measures, it does not fix.

The models are the integration tests' tiny SD1.5 family in the real file formats (ComfyUI's own
loaders read them), so a run takes seconds; what leaks is independent of the widths.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable

from bench.memory import DTYPES, MiB, rss_bytes, trimmed_rss_bytes
from bench.report import Section, Target

IMAGES = ("reference.png", "person_a.png", "person_b.png")
WEIGHTS = (1.0, 0.8, 1.2, 0.6)
RUNS, SMOKE_RUNS = 50, 6
WARMUP = 5
SOAK_STEPS, SOAK_PX = 1, 64  # what is loaded and kept matters here, not the sampling
RSS_GROWTH_LIMIT = 0.02
# Classes whose live instances are counted after every run (by class name: our package is loaded
# under ComfyUI's path-derived module name).
TRACKED = ("ConsistentIDAdapter", "LoadedConsistentID", "EncodedFace", "FaceFeatures", "IDAttentionPatch",
           "IdentityBranch", "ModelPatcher", "LoRAAdapter", "Tensor", "Parameter")


def build_models(comfy) -> None:
    """The tiny SD1.5/SDXL model files, InsightFace pack and reference photos in ComfyUI's folders."""
    from consistentid_cli.selftest import tiny_comfy_models

    tiny_comfy_models.build_install(comfy.base_directory)
    import folder_paths

    folder_paths.filename_list_cache.clear()


def soak_prompt(run: int) -> dict:
    """The SD1.5 portrait graph at test size with this run's image, weight and adapter dtype."""
    from consistentid_cli.selftest.example_workflows import at_small_size, load_api

    prompt = at_small_size(load_api("sd15_portrait"))
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] == "LoadImage":
            inputs["image"] = IMAGES[run % len(IMAGES)]
        elif node["class_type"] == "ConsistentID_ModelLoader":
            inputs["dtype"] = DTYPES[run % len(DTYPES)]
        elif node["class_type"] == "ConsistentID_Apply":
            inputs["weight"] = WEIGHTS[run % len(WEIGHTS)]
        elif node["class_type"] == "KSampler":
            inputs["seed"], inputs["steps"] = run, SOAK_STEPS
        elif node["class_type"] == "EmptyLatentImage":
            inputs["width"] = inputs["height"] = SOAK_PX
    return prompt


def free_memory(comfy, executor) -> None:
    """What ComfyUI's ``/free`` endpoint asks the prompt worker to do (unload_models + free_memory)."""
    comfy.model_management.unload_all_models()
    executor.executor.reset()
    gc.collect()
    comfy.model_management.soft_empty_cache()


def live_objects() -> dict[str, int]:
    counts = Counter(type(obj).__name__ for obj in gc.get_objects())
    return {name: counts.get(name, 0) for name in TRACKED}


def run(comfy, sizes, progress: Callable[[str], None] = print, runs: int | None = None) -> list[Section]:
    """``runs`` default: 50, or 6 for the smoke sizes (CI keeps the script working)."""
    from bench.comfy_env import HeadlessExecutor

    runs = runs or (SMOKE_RUNS if sizes.name == "smoke" else RUNS)
    warmup = min(WARMUP, runs - 1)
    progress(f"[soak] building tiny models; {runs} runs of the SD1.5 portrait graph")
    build_models(comfy)
    executor = HeadlessExecutor(comfy)
    gc.collect()
    before = {"run": 0, "rss": rss_bytes(), "rss_trimmed": trimmed_rss_bytes(), **live_objects()}  # models written, nothing run yet
    samples = []
    for index in range(runs):
        prompt = soak_prompt(index)
        outputs = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
        if not executor.run(prompt, outputs).success:
            raise RuntimeError(f"soak run {index + 1} failed: {executor.server.messages[-1]}")
        free_memory(comfy, executor)
        rss = rss_bytes()
        samples.append({"run": index + 1, "rss": rss, "rss_trimmed": trimmed_rss_bytes(), **live_objects()})
        if (index + 1) % 10 == 0 or index == 0:
            trimmed = samples[-1]["rss_trimmed"]
            progress(f"  run {index + 1}: RSS {rss / MiB:.1f} MiB"
                     + (f" ({trimmed / MiB:.1f} MiB trimmed)" if trimmed is not None else "")
                     + f", adapters alive {samples[-1]['ConsistentIDAdapter']}, tensors {samples[-1]['Tensor']}")
    base, last = samples[warmup - 1], samples[-1]
    measured = "rss_trimmed" if last["rss_trimmed"] is not None else "rss"  # no glibc: the plain RSS
    growth = {key: (last[key] - base[key]) / base[key] for key in ("rss", measured)}
    rows = [[name, before[name], base[name], last[name], max(s[name] for s in samples[warmup - 1:]), last[name] - base[name]]
            for name in TRACKED]
    for key, label in (("rss_trimmed", "RSS after malloc_trim (MiB)"), ("rss", "RSS (MiB)")):
        if last[key] is not None:
            rows.insert(0, [label, before[key] / MiB, base[key] / MiB, last[key] / MiB,
                            max(s[key] for s in samples[warmup - 1:]) / MiB, (last[key] - base[key]) / MiB])
    grown = [name for name in TRACKED if last[name] > base[name]]
    return [Section(
        name="soak",
        title=f"Soak: SD1.5 portrait graph x {runs} (image, weight, adapter dtype changed; ComfyUI free-memory "
              f"between runs), after run {warmup} vs after run {runs}",
        columns=["alive after the run", "before run 1", f"run {warmup}", f"run {runs}", "max since warm-up",
                 f"change {warmup} to {runs}"],
        rows=rows,
        targets=[Target(f"soak: {'trimmed ' if measured == 'rss_trimmed' else ''}RSS growth after warm-up (run {warmup} to {runs})",
                        growth[measured], RSS_GROWTH_LIMIT),
                 Target("soak: classes whose live count grew", float(len(grown)), 0.0)],
        notes=[f"tiny models in the real file formats; {warmup} warm-up runs; grown: {', '.join(grown) or 'none'}",
               f"plain RSS growth {growth['rss']:+.2%} (glibc's free pages included, see the module docstring)",
               "object counts are gc-tracked instances by class name after free-memory and gc.collect()"],
        data={"before": before, "samples": samples, "rss_growth": growth["rss"], "trimmed_rss_growth": growth.get("rss_trimmed")},
    )]


def main(argv: list[str] | None = None) -> int:
    """``python -m bench.soak [--runs N] [--comfyui PATH]``: just the soak, printed as a table."""
    import argparse

    from bench import comfy_env
    from bench.models import SMOKE
    from bench.report import format_report

    parser = argparse.ArgumentParser(prog="python -m bench.soak")
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--comfyui", metavar="PATH")
    args = parser.parse_args(argv)
    comfy = comfy_env.start(args.comfyui)
    sections = run(comfy, SMOKE, lambda message: print(message, flush=True), runs=args.runs)
    print("\n" + format_report(sections), flush=True)
    return 0 if all(target.met for section in sections for target in section.targets) else 1


if __name__ == "__main__":
    raise SystemExit(main())
