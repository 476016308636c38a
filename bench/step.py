"""Sampling-step cost: plain ComfyUI model vs ``patch_model`` vs the original's unmerged LoRA.

Each variant owns its own UNet instance with identical weights, loaded once, so a timed call is
exactly one UNet forward as ComfyUI's sampler makes it (``BaseModel.apply_model`` with the
patcher's ``transformer_options``, ``cond_or_uncond`` and ``sigmas``), batch 2 (cond + uncond).
Sharing one instance would make ComfyUI swap merged weights in and out between variants, which
measures re-patching and allocator page faults instead of steps (design.md §8).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from bench import stats
from bench.models import Sizes, build_adapter, build_unet, id_tokens
from bench.unmerged import apply_runtime_lora, install_runtime_id_attention

BATCH_CHUNKS = [1, 0]  # uncond, cond: the order ComfyUI's calc_cond_batch was seen to use
VARIANTS = ("plain", "patched", "unmerged")
FAITHFUL_TOLERANCE = 1e-2  # |unmerged − patched| relative to the LoRA's effect |patched − plain|


def comfy_attention(q, k, v, heads, **kwargs):
    """ComfyUI's ``optimized_attention`` (what CrossAttention and our patch call), looked up per call."""
    import comfy.ldm.modules.attention as attention

    return attention.optimized_attention(q, k, v, heads, **kwargs)


@dataclass
class Inputs:
    x: torch.Tensor
    sigma: torch.Tensor
    context: torch.Tensor
    y: torch.Tensor | None = None  # SDXL's pooled-text + size embedding input


def make_inputs(px: int, context_dim: int, sigma: float, seed: int = 5, adm_channels: int | None = None) -> Inputs:
    generator = torch.Generator().manual_seed(seed + px)
    latent = px // 8
    batch = len(BATCH_CHUNKS)
    return Inputs(
        x=torch.randn(batch, 4, latent, latent, generator=generator),
        sigma=torch.full((batch,), sigma),
        context=torch.randn(batch, 77, context_dim, generator=generator),
        y=None if adm_channels is None else torch.randn(batch, adm_channels, generator=generator),
    )


def step_options(patcher, inputs: Inputs, replace: dict | None = None) -> dict:
    """The transformer_options ComfyUI's sampler passes for one batched cond+uncond call."""
    options = dict(patcher.model_options["transformer_options"])
    options["cond_or_uncond"] = list(BATCH_CHUNKS)
    options["sigmas"] = inputs.sigma
    if replace is not None:
        patches = dict(options.get("patches_replace", {}))
        patches["attn2"] = replace
        options["patches_replace"] = patches
    return options


class OpCounter(TorchDispatchMode):
    """Counts the aten operations a forward dispatches, and how many of them read a value to the host."""

    def __init__(self) -> None:
        super().__init__()
        self.ops = 0
        self.host_reads = 0

    # .item(), float(tensor): a sync on a GPU. Under inference_mode it arrives as aten.item, otherwise
    # as the _local_scalar_dense it decomposes into.
    HOST_READS = (torch.ops.aten.item, torch.ops.aten._local_scalar_dense)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        self.host_reads += func.overloadpacket in self.HOST_READS
        return func(*args, **(kwargs or {}))


def work_per_call(patcher, inputs: Inputs) -> dict[str, int]:
    """FLOPs, aten operations and host reads of one forward: the step's cost without the machine's noise.

    On a shared CPU a call's time moves by ±10-25 % from round to round; these counts do not move at
    all, so they show what a variant adds even when the timings cannot resolve a 2 % difference.
    """
    from torch.utils.flop_counter import FlopCounterMode

    counter = OpCounter()
    with FlopCounterMode(display=False) as flops, counter:
        forward(patcher, inputs)
    return {"flops": int(flops.get_total_flops()), "ops": counter.ops, "host_reads": counter.host_reads}


def forward(patcher, inputs: Inputs, replace: dict | None = None) -> torch.Tensor:
    extra = {} if inputs.y is None else {"y": inputs.y}
    with torch.inference_mode():
        return patcher.model.apply_model(
            inputs.x, inputs.sigma, c_crossattn=inputs.context, transformer_options=step_options(patcher, inputs, replace),
            **extra,
        )


@dataclass
class SDXLPair:
    """Plain and patched SDXL-topology UNets (separate instances, shared weights): the SDXL step rows."""

    sizes: Sizes
    patchers: dict[str, Any]
    sigma: float
    shares: dict[int, list[float]] = field(default_factory=dict)

    @classmethod
    def build(cls, comfy, sizes: Sizes, progress: Callable[[str], None] = print) -> "SDXLPair":
        patch = comfy.our("patch")
        started = time.perf_counter()
        plain = build_unet(sizes.sdxl_unet, seed=0, base_model="sdxl")
        base_patched = build_unet(sizes.sdxl_unet, like=plain, base_model="sdxl")
        adapter = build_adapter(sizes.sdxl_adapter, base_model="sdxl")
        cond, uncond = id_tokens(adapter)
        patched = patch.patch_model(base_patched, adapter, cond, uncond)
        comfy.model_management.load_models_gpu([patched], force_full_load=True)
        sigma = float(plain.get_model_object("model_sampling").percent_to_sigma(0.5))
        pair = cls(sizes, {"plain": plain, "patched": patched}, sigma)
        out = {name: forward(patcher, pair.inputs(min(sizes.sdxl_step_rounds))) for name, patcher in pair.patchers.items()}
        if not torch.isfinite(out["patched"]).all() or torch.equal(out["patched"], out["plain"]):
            raise RuntimeError("bad SDXL benchmark models: the patched output is not finite or equals the plain one")
        progress(f"  built the SDXL pair ({sizes.sdxl_unet['model_channels']} channels) in {time.perf_counter() - started:.0f} s")
        return pair

    def inputs(self, px: int) -> Inputs:
        return make_inputs(px, int(self.sizes.sdxl_unet["context_dim"]), self.sigma,
                           adm_channels=int(self.sizes.sdxl_unet["adm_in_channels"]))

    def measure(self, px: int, progress: Callable[[str], None] = print) -> dict[str, list[float]]:
        inputs = self.inputs(px)
        calls = {name: (lambda p=patcher: forward(p, inputs)) for name, patcher in self.patchers.items()}
        rounds = self.sizes.sdxl_step_rounds[px]
        progress(f"  SDXL {px} px: plain, patched; {self.sizes.warmup} warm-up + {rounds} rounds")
        self.shares[px] = []
        return stats.run_interleaved(
            calls, rounds, self.sizes.warmup, on_round=round_reporter(progress, self.shares[px]),
            **cpu_share_options(self.shares[px], rounds),
        )


class Attn2Timer:
    """Wraps attn2 replacements and sums the seconds spent inside them (one UNet call at a time)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, patch: Callable) -> Callable:
        def timed(q, k, v, extra_options):
            start = time.perf_counter()
            out = patch(q, k, v, extra_options)
            self.seconds += time.perf_counter() - start
            return out

        return timed


def text_only_attn2(q, k, v, extra_options):
    """What ComfyUI's CrossAttention does without a patch (baseline for the ID-branch timing)."""
    return comfy_attention(
        q, k, v, extra_options["n_heads"], attn_precision=extra_options.get("attn_precision"), transformer_options=extra_options
    )


def cpu_share_options(shares: list[float], rounds: int) -> dict[str, Any]:
    """``run_interleaved`` options that record each round's lowest CPU share into ``shares`` and add
    rounds (up to twice ``rounds``) until a majority of ``rounds`` ran on a quiet machine."""
    return {"cpu_clock": time.process_time, "threads": torch.get_num_threads(), "shares": shares,
            "min_quiet": rounds // 2 + 1, "max_rounds": 2 * rounds}


def round_reporter(progress: Callable[[str], None], shares: list[float], suffix: str = "") -> Callable:
    """Progress line per round: each call's seconds and the round's lowest CPU share."""
    def report(index: int, times: dict) -> None:
        calls = ", ".join(f"{name}{suffix} {seconds:.2f} s" for name, seconds in times.items())
        progress(f"    round {index + 1}: {calls} (CPU share {shares[-1]:.2f})")

    return report


def strip_mask(index: int, count: int, size: int = 64) -> torch.Tensor:
    """(size, size) mask, 1 on vertical strip ``index`` of ``count`` (one person per strip)."""
    mask = torch.zeros(size, size)
    width = size // count
    mask[:, index * width:(index + 1) * width if index < count - 1 else size] = 1.0
    return mask


@dataclass
class StepRig:
    """Three UNet instances (plain, patched, unmerged) plus identity-count variants of the patched one."""

    comfy: Any
    sizes: Sizes
    adapter: Any
    patchers: dict[str, Any]
    identity_patchers: dict[int, Any]
    sigma: float
    check: dict[str, float] = field(default_factory=dict)
    measured: dict[int, dict[str, list[float]]] = field(default_factory=dict)
    shares: dict[Any, list[float]] = field(default_factory=dict)  # per comparison: lowest CPU share per round

    @classmethod
    def build(cls, comfy, sizes: Sizes, progress: Callable[[str], None] = print) -> "StepRig":
        patch = comfy.our("patch")
        started = time.perf_counter()
        plain = build_unet(sizes.unet, seed=0)
        base_patched = build_unet(sizes.unet, like=plain)
        base_unmerged = build_unet(sizes.unet, like=plain)
        adapter = build_adapter(sizes.adapter)
        cond, uncond = id_tokens(adapter)
        progress(f"  built 3 UNet instances (shared weights) and the adapter in {time.perf_counter() - started:.0f} s")

        probe_key = next(key for key, _ in adapter.lora_pairs())
        pristine = plain.model.get_parameter(probe_key).detach().clone()
        patched = patch.patch_model(base_patched, adapter, cond, uncond)
        comfy.model_management.load_models_gpu([patched], force_full_load=True)  # merges the LoRA into instance 2, once
        if not torch.equal(plain.model.get_parameter(probe_key), pristine):
            raise RuntimeError("merging the LoRA into the patched instance changed the plain instance's weights")
        apply_runtime_lora(base_unmerged.model.diffusion_model, adapter)
        unmerged = base_unmerged.clone()
        install_runtime_id_attention(unmerged, adapter, cond, uncond, comfy_attention)

        identity_patchers = {0: base_patched.clone()}
        patch.merge_lora(identity_patchers[0], adapter, 1.0)  # same weights as `patched`, no ID branch
        for count in sizes.identity_counts:
            if count == 0:
                continue
            chained = base_patched
            for index in range(count):  # distinct tokens per person; their values do not affect timing
                person = 1.0 + 0.01 * (index + 1)
                chained = patch.patch_model(chained, adapter, cond * person, uncond, attn_mask=strip_mask(index, count))
            identity_patchers[count] = chained
        sigma = float(plain.get_model_object("model_sampling").percent_to_sigma(0.5))
        rig = cls(comfy, sizes, adapter, {"plain": plain, "patched": patched, "unmerged": unmerged}, identity_patchers,
                  sigma)
        rig.check_outputs(min(sizes.unmerged_resolutions))
        progress(
            f"  setup {time.perf_counter() - started:.0f} s; unmerged stand-in matches the patched model to "
            f"{rig.check['unmerged_vs_patched_relative']:.1e} of the LoRA's effect"
        )
        return rig

    def inputs(self, px: int) -> Inputs:
        return make_inputs(px, self.sizes.context_dim, self.sigma)

    def check_outputs(self, px: int) -> None:
        """The stand-in computes what we compute, and the LoRA really changes the output."""
        inputs = self.inputs(px)
        out = {name: forward(patcher, inputs) for name, patcher in self.patchers.items()}
        lora_effect = float((out["patched"] - out["plain"]).abs().max())
        mismatch = float((out["unmerged"] - out["patched"]).abs().max())
        self.check = {
            "px": px,
            "patched_vs_plain_max_abs": lora_effect,
            "unmerged_vs_patched_max_abs": mismatch,
            "unmerged_vs_patched_relative": mismatch / lora_effect if lora_effect else float("inf"),
        }
        if not torch.isfinite(out["plain"]).all() or lora_effect == 0.0:
            raise RuntimeError(f"bad benchmark models: {self.check}")
        if self.check["unmerged_vs_patched_relative"] > FAITHFUL_TOLERANCE:
            raise RuntimeError(f"the unmerged stand-in does not compute what patch_model computes: {self.check}")

    def measure(self, px: int, variants: Sequence[str], progress: Callable[[str], None] = print) -> dict[str, list[float]]:
        """Interleaved step times at ``px`` (cached per resolution; a superset is reused)."""
        have = self.measured.get(px, {})
        if all(name in have for name in variants):
            return have
        inputs = self.inputs(px)
        calls = {name: (lambda p=self.patchers[name]: forward(p, inputs)) for name in variants}
        rounds = self.sizes.rounds_for(px)
        progress(f"  {px} px: {', '.join(variants)}; {self.sizes.warmup} warm-up + {rounds} rounds")
        self.shares[px] = []
        samples = stats.run_interleaved(
            calls, rounds, self.sizes.warmup, on_round=self._report(progress, self.shares[px]),
            **cpu_share_options(self.shares[px], rounds),
        )
        self.measured[px] = samples
        return samples

    @staticmethod
    def _report(progress: Callable[[str], None], shares: list[float], suffix: str = "") -> Callable:
        return round_reporter(progress, shares, suffix)

    def quiet(self, key: Any) -> list[int]:
        """Rounds of one comparison that ran on a quiet machine (empty: none did)."""
        return stats.quiet_rounds(self.shares.get(key, []))

    def measure_identities(self, progress: Callable[[str], None] = print) -> dict[str, dict[int, list[float]]]:
        """Step time and seconds inside attn2 per step, for each number of identities."""
        px = self.sizes.identity_resolution
        inputs = self.inputs(px)
        attn2: dict[int, list[float]] = {count: [] for count in self.identity_patchers}

        def call(count: int) -> Callable[[], None]:
            patcher = self.identity_patchers[count]
            installed = patcher.model_options["transformer_options"].get("patches_replace", {}).get("attn2", {})

            def run() -> None:
                timer = Attn2Timer()
                keys = [slot.patch_key for slot, _ in self.adapter.cross_attention_layers()]
                replace = {key: timer.wrap(installed.get(key, text_only_attn2)) for key in keys}
                forward(patcher, inputs, replace)
                attn2[count].append(timer.seconds)

            return run

        rounds = self.sizes.identity_rounds
        progress(f"  {px} px, identities {list(self.identity_patchers)}; {self.sizes.warmup} warm-up + {rounds} rounds")
        self.shares["identities"] = []
        steps = stats.run_interleaved(
            {count: call(count) for count in self.identity_patchers}, rounds, self.sizes.warmup,
            on_round=self._report(progress, self.shares["identities"], " IDs"),
            **cpu_share_options(self.shares["identities"], rounds),
        )
        skip = self.sizes.warmup  # warm-up calls appended attn2 samples too
        return {"step": steps, "attn2": {count: values[skip:] for count, values in attn2.items()}}
