"""The step and scaling tables from a :class:`bench.step.StepRig`'s measurements."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bench import stats
from bench.report import Section, Target
from bench.step import VARIANTS, SDXLPair, StepRig, work_per_call

SD15_STEP_LIMIT = 1.02  # patched/plain per SD1.5 step (issue 12 item 6)

TIMING_NOTE = (
    "Interleaved rounds in rotating order; 'quiet' = rounds in which every call kept >= 93% of its 2 cores "
    "(process CPU time / wall time; rounds are added, up to twice N, until most are quiet); times are medians and ratios medians of per-round ratios over the quiet "
    "rounds (over all rounds when none was quiet); 'fastest' = ratio of the fastest runs, a cross-check."
)


def quiet_label(quiet: Sequence[int], total: int) -> str:
    return f"{len(quiet)}/{total}" if quiet else f"0/{total} (all used)"


def step_section(rig: StepRig, progress: Callable[[str], None] = print) -> Section:
    rows, targets, data = [], [], {"check": rig.check, "samples": {}, "cpu_shares": {}, "work": {}}
    for px in rig.sizes.unmerged_resolutions:
        data["work"][px] = {name: work_per_call(rig.patchers[name], rig.inputs(px)) for name in VARIANTS}
        samples = rig.measure(px, VARIANTS, progress)
        quiet = rig.quiet(px)
        data["samples"][px] = {name: samples[name] for name in VARIANTS}
        data["cpu_shares"][px] = rig.shares[px]
        over_plain = stats.ratio(samples, "patched", "plain", quiet)
        over_unmerged = stats.ratio(samples, "patched", "unmerged", quiet)
        rows.append([
            px, quiet_label(quiet, len(samples["plain"])), *(stats.median_of(samples[name], quiet) for name in VARIANTS),
            over_plain, over_unmerged, stats.ratio(samples, "unmerged", "plain", quiet),
            stats.fastest_ratio(samples, "patched", "plain", quiet), stats.fastest_ratio(samples, "patched", "unmerged", quiet),
        ])
        targets.append(Target(f"step {px} px: patched/plain", over_plain, SD15_STEP_LIMIT))
        targets.append(Target(f"step {px} px: patched/unmerged", over_unmerged, 0.90))
    return Section(
        name="step",
        title="Sampling step (SD1.5 UNet, batch 2 = cond + uncond, s per step)",
        columns=["px", "quiet", "plain s", "patched s", "unmerged s", "patched/plain", "patched/unmerged",
                 "unmerged/plain", "patched/plain fastest", "patched/unmerged fastest"],
        rows=rows,
        targets=targets,
        notes=[
            "patched = nodes.patch.patch_model (LoRA merged as weight patches + ID-branch attn2 patch); "
            "unmerged = the original's design (LoRA on q/k/v/out of all 32 attention layers and to_k_ip/to_v_ip "
            "evaluated at every call), bench/unmerged.py.",
            f"The unmerged stand-in's output equals the patched model's to "
            f"{rig.check['unmerged_vs_patched_relative']:.1e} of the LoRA's effect (max abs "
            f"{rig.check['unmerged_vs_patched_max_abs']:.1e} vs {rig.check['patched_vs_plain_max_abs']:.1e}).",
            TIMING_NOTE,
            *work_notes(data["work"], VARIANTS),
        ],
        data=data,
    )


def work_notes(work: dict[int, dict[str, dict[str, int]]], variants: Sequence[str]) -> list[str]:
    """One line per size: FLOPs, aten ops and host reads per call of each variant (counted, not timed)."""
    lines = []
    for px, counts in work.items():
        plain = counts["plain"]
        parts = [f"{name} {c['flops'] / 1e9:.1f} GFLOP ({c['flops'] / plain['flops']:.4f}x plain), {c['ops']} ops, "
                 f"{c['host_reads']} host reads" for name, c in ((n, counts[n]) for n in variants)]
        lines.append(f"Work per call at {px} px (torch.utils.flop_counter and an aten op count; the same every run): " + "; ".join(parts) + ".")
    return lines


def sdxl_step_section(pair: SDXLPair, progress: Callable[[str], None] = print) -> Section:
    """patched/plain per step on the SDXL topology (70 cross-attention layers), reported."""
    rows, data = [], {"samples": {}, "cpu_shares": {}, "work": {}, "model_channels": pair.sizes.sdxl_unet["model_channels"]}
    for px in sorted(pair.sizes.sdxl_step_rounds):
        data["work"][px] = {name: work_per_call(patcher, pair.inputs(px)) for name, patcher in pair.patchers.items()}
        samples = pair.measure(px, progress)
        quiet = stats.quiet_rounds(pair.shares[px])
        data["samples"][px] = samples
        data["cpu_shares"][px] = pair.shares[px]
        rows.append([px, (px // 8) ** 2, quiet_label(quiet, len(samples["plain"])), stats.median_of(samples["plain"], quiet),
                     stats.median_of(samples["patched"], quiet), stats.ratio(samples, "patched", "plain", quiet),
                     stats.fastest_ratio(samples, "patched", "plain", quiet)])
    channels = pair.sizes.sdxl_unet["model_channels"]
    return Section(
        name="step_sdxl",
        title=f"Sampling step, SDXL topology at {channels} channels (batch 2 = cond + uncond, s per step)",
        columns=["px", "latent tokens", "quiet", "plain s", "patched s", "patched/plain", "patched/plain fastest"],
        rows=rows,
        notes=[
            f"SDXL's UNet layout (70 cross-attention layers in 2- and 10-block transformers, 2048-d context, "
            f"64-d heads) at model_channels {channels} instead of 320, and {'/'.join(str(px) for px in sorted(pair.sizes.sdxl_step_rounds))} px "
            "instead of 1024: the full model in fp32 and a 1024 px step do not fit this CPU. patched = patch_model "
            "(LoRA merged, ID branch on all 70 layers).",
            TIMING_NOTE,
            *work_notes(data["work"], ("plain", "patched")),
        ],
        data=data,
    )


def resolution_section(rig: StepRig, progress: Callable[[str], None] = print) -> Section:
    rows, data = [], {"samples": {}, "cpu_shares": {}}
    base = None
    for px in rig.sizes.scaling_resolutions:
        samples = rig.measure(px, ("plain", "patched"), progress)
        quiet = rig.quiet(px)
        data["samples"][px] = {name: samples[name] for name in ("plain", "patched")}
        data["cpu_shares"][px] = rig.shares[px]
        plain = stats.median_of(samples["plain"], quiet)
        base = base or plain
        rows.append([px, (px // 8) ** 2, quiet_label(quiet, len(samples["plain"])), plain,
                     stats.median_of(samples["patched"], quiet), stats.ratio(samples, "patched", "plain", quiet),
                     stats.fastest_ratio(samples, "patched", "plain", quiet), plain / base])
    return Section(
        name="scaling_resolution",
        title="Scaling with resolution (s per step, batch 2)",
        columns=["px", "latent tokens", "quiet", "plain s", "patched s", "patched/plain", "patched/plain fastest",
                 "plain vs smallest"],
        rows=rows,
        notes=["The ID branch adds one attention over 4 tokens per cross-attention layer, linear in latent "
               "tokens like the text attention; self-attention (quadratic) and the convolutions dominate a step.",
               TIMING_NOTE],
        data=data,
    )


def identity_section(rig: StepRig, progress: Callable[[str], None] = print) -> Section:
    measured = rig.measure_identities(progress)
    steps, attn2 = measured["step"], measured["attn2"]
    quiet = rig.quiet("identities")
    counts = sorted(steps)
    rows, branch = [], {}
    for count in counts:
        step = stats.median_of(steps[count], quiet)
        # Paired per round (same round, same machine state), then the median over the quiet rounds.
        branch[count] = stats.median_of([a - b for a, b in zip(attn2[count], attn2[0])], quiet)
        rows.append([count, quiet_label(quiet, len(steps[count])), step, stats.ratio(steps, count, 0, quiet),
                     stats.median_of(attn2[count], quiet) * 1e3, branch[count] * 1e3, branch[count] / step])
    intercept, slope, r2 = stats.linear_fit(counts, [branch[c] for c in counts])
    most = max(counts)
    targets = [
        Target(f"ID branch, {most} identities, share of a step", branch[most] / stats.median_of(steps[most], quiet), 0.05),
        Target("ID branch vs identities: linear fit r²", r2, 0.95, ">="),
    ]
    return Section(
        name="scaling_identities",
        title=f"Scaling with identities ({rig.sizes.identity_resolution} px, chained patch_model with masks)",
        columns=["identities", "quiet", "step s", "step / 0 IDs", "attn2 ms/step", "ID branch ms/step",
                 "ID share of step"],
        rows=rows,
        targets=targets,
        notes=[
            "0 IDs = the same merged-LoRA weights without ID patches; each identity is one more patch_model "
            "with its own tokens and a strip mask. attn2 ms/step = seconds inside the 16 cross-attention "
            "computations (timed in place); ID branch = that minus the 0-ID text attention of the same round.",
            f"Linear fit: {slope * 1e3:.2f} ms per identity (+{intercept * 1e3:.2f} ms), r² = {r2:.3f}.",
            TIMING_NOTE,
        ],
        data={"step": steps, "attn2": attn2, "cpu_shares": rig.shares["identities"],
              "fit": {"intercept_s": intercept, "slope_s": slope, "r2": r2}},
    )
