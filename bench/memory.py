"""Peak process memory of a plain vs a patched model forward, each in a fresh subprocess.

``python -m bench.memory --variant plain|patched [--adapter-dtype fp32|fp16|bf16] --sizes full|smoke
--px N --comfyui PATH`` is the worker: it builds what the variant needs (the adapter first, so its
construction is not on top of the UNet), runs one batch-2 forward and prints one JSON line with the
RSS high-water mark (``VmHWM``) and the resident size after each phase. Separate processes keep
one variant's peak out of the other's; the allocator runs with glibc defaults (no MALLOC_* tuning),
as a user's ComfyUI does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bench.report import Section, Target

MiB = 1024 * 1024
DTYPES = ("fp32", "fp16", "bf16")
RESULT_PREFIX = "BENCH_MEMORY "


def rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm", encoding="ascii") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def trimmed_rss_bytes() -> int | None:
    """Resident set size after glibc's ``malloc_trim(0)``, or ``None`` without glibc.

    glibc keeps freed heap pages mapped for reuse, so the plain RSS of a process that loads and frees
    hundreds of MiB per run wanders by ±100 MiB with nothing alive. Trimming returns those free pages
    to the OS (it frees nothing that is in use), which leaves what is still allocated: what a leak grows.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(name) if name else None
    if libc is None or not hasattr(libc, "malloc_trim"):
        return None
    libc.malloc_trim(0)
    return rss_bytes()


def peak_rss_bytes() -> int:
    """High-water mark of this process's resident set size: ``VmHWM``, which starts afresh at exec.

    ``getrusage().ru_maxrss`` would not do: Linux carries it over from the parent across fork and
    exec, so every worker would report the benchmark parent's peak.
    """
    with open("/proc/self/status", encoding="ascii") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(argv: list[str] | None = None) -> dict:
    args = _worker_args(argv)
    from bench import comfy_env

    comfy = comfy_env.start(args.comfyui)
    import torch

    from bench.models import FULL, SMOKE, build_adapter, build_unet, id_tokens, module_bytes
    from bench.step import forward, make_inputs

    sizes = FULL if args.sizes == "full" else SMOKE
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.adapter_dtype]
    phases = {"imported": rss_bytes()}
    result: dict = {"variant": args.variant, "adapter_dtype": args.adapter_dtype, "px": args.px}
    adapter = None
    if args.variant == "patched":
        adapter = build_adapter(sizes.adapter, dtype=dtype)
        cond, uncond = id_tokens(adapter)
        phases["adapter"] = rss_bytes()
        result["adapter_bytes"] = module_bytes(adapter)
    model = build_unet(sizes.unet, seed=0)
    phases["unet"] = rss_bytes()
    if adapter is not None:
        model = comfy.our("patch").patch_model(model, adapter, cond, uncond)
        comfy.model_management.load_models_gpu([model], force_full_load=True)
        phases["patched"] = rss_bytes()
        result["backup_bytes"] = sum(b.weight.numel() * b.weight.element_size() for b in model.backup.values())
    result["unet_bytes"] = module_bytes(model.model.diffusion_model)
    inputs = make_inputs(args.px, sizes.context_dim, sigma=1.0)
    start = time.perf_counter()
    out = forward(model, inputs)
    result["forward_s"] = time.perf_counter() - start
    result["finite"] = bool(torch.isfinite(out).all())
    phases["forward"] = rss_bytes()
    result["phases"] = phases
    result["peak_rss_bytes"] = peak_rss_bytes()
    print(RESULT_PREFIX + json.dumps(result), flush=True)
    return result


def _worker_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.memory")
    parser.add_argument("--variant", choices=("plain", "patched"), required=True)
    parser.add_argument("--adapter-dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--sizes", choices=("full", "smoke"), default="full")
    parser.add_argument("--px", type=int, default=512)
    parser.add_argument("--comfyui")
    return parser.parse_args(argv)


def run_worker(variant: str, adapter_dtype: str, sizes_name: str, px: int, comfyui: Path) -> dict:
    """One fresh subprocess; the allocator tuning of the timing runs is removed from its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    command = [sys.executable, "-m", "bench.memory", "--variant", variant, "--adapter-dtype", adapter_dtype,
               "--sizes", sizes_name, "--px", str(px), "--comfyui", str(comfyui)]
    done = subprocess.run(command, cwd=Path(__file__).resolve().parents[1], env=env, capture_output=True, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"memory worker {variant}/{adapter_dtype} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(lines[-1][len(RESULT_PREFIX):])


def adapter_sizes(overrides: dict) -> dict[str, dict[str, int]]:
    """The adapter's bytes per dtype, in total and per part (LoRA, ID k/v, FacialEncoder, ID projection)."""
    import torch

    from bench.models import build_adapter, module_bytes

    adapter = build_adapter(overrides)
    parts = {
        "lora": [layer.lora(t) for layer in adapter.layers for t in ("to_q", "to_k", "to_v", "to_out")],
        "id_kv": [m for layer in adapter.layers if layer.to_k_ip is not None for m in (layer.to_k_ip, layer.to_v_ip)],
        "facial_encoder": [adapter.facial],
        "id_projection": [adapter.id_projection],
    }
    out = {}
    for name, dtype in (("fp32", torch.float32), ("fp16", torch.float16), ("bf16", torch.bfloat16)):
        out[name] = {"total": module_bytes(adapter, dtype)}
        out[name].update({part: sum(module_bytes(m, dtype) for m in modules) for part, modules in parts.items()})
    return out


def run(sizes, comfyui: Path, progress: Callable[[str], None] = print) -> list[Section]:
    px = sizes.memory_resolution
    results = {}
    for variant, dtype in (("plain", "fp32"), ("patched", "fp32"), ("patched", "fp16")):
        started = time.perf_counter()
        results[f"{variant}-{dtype}"] = result = run_worker(variant, dtype, sizes.name, px, comfyui)
        progress(f"  {variant} (adapter {dtype}): peak {result['peak_rss_bytes'] / MiB:.0f} MiB "
                 f"({time.perf_counter() - started:.0f} s)")
    plain = results["plain-fp32"]
    rows, targets = [], []
    for key, result in results.items():
        phases = result["phases"]
        rows.append([
            key, result["peak_rss_bytes"] / MiB, phases["imported"] / MiB, result["unet_bytes"] / MiB,
            result.get("adapter_bytes", 0) / MiB, result.get("backup_bytes", 0) / MiB,
            result["peak_rss_bytes"] / plain["peak_rss_bytes"],
            (result["peak_rss_bytes"] - phases["imported"]) / (plain["peak_rss_bytes"] - plain["phases"]["imported"]),
        ])
        if key != "plain-fp32":
            targets.append(Target(f"memory: peak {key}/plain", result["peak_rss_bytes"] / plain["peak_rss_bytes"], 1.15))
    sizes_by_dtype = adapter_sizes(sizes.adapter)
    adapter_rows = [[dtype, *(sizes_by_dtype[dtype][k] / MiB for k in ("total", "lora", "id_kv", "facial_encoder", "id_projection"))]
                    for dtype in DTYPES]
    return [
        Section(
            name="memory",
            title=f"Peak process memory, one forward at {px} px, batch 2 (MiB, fresh process each)",
            columns=["variant", "peak RSS", "after imports", "UNet weights", "adapter", "ComfyUI weight backup", "peak / plain",
                     "above imports / plain"],
            rows=rows,
            targets=targets,
            notes=[
                "patched = adapter built, patch_model, ComfyUI load (LoRA merged), forward; the UNet is fp32 (CPU).",
                "ComfyUI keeps the un-merged original of every patched weight (its backup) to unpatch later.",
                "'after imports' = resident size once torch and ComfyUI are imported; 'above imports / plain' "
                "compares the peaks without that common base.",
            ],
            data={"workers": results},
        ),
        Section(
            name="adapter_size",
            title="Adapter size by dtype (MiB)",
            columns=["dtype", "total", "LoRA", "to_k_ip/to_v_ip", "FacialEncoder", "ID projection"],
            rows=adapter_rows,
            data=sizes_by_dtype,
        ),
    ]


if __name__ == "__main__":
    worker()
