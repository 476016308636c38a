"""Training throughput: the feature cache (``train.cache`` + ``train.shards``) vs encoding on the fly.

One trainer (``train.step.TrainingModule`` on ``train.hosts.comfy.ComfyHost``: ComfyUI's UNet, VAE,
CLIP-L and CLIP-ViT-H, random weights at release sizes, or tiny ones for ``--smoke``), one
optimizer, one synthetic data set; two ways to feed it, timed in interleaved rounds:

* ``on the fly``: the trainer's own DataLoader path (PNG decode, sample construction, then the frozen
  VAE, text encoder and CLIP-ViT-H on the whole image and every valid facial crop) + the step;
* ``cached``: the same rows read back from WebDataset shards written by ``train.cache`` (float16)
  + the same step.

A timed call is one optimizer step (load a batch, forward, backward, AdamW), so the ratio of the
two is the ratio of training samples/s. Both readers run in the main process (no worker overlap),
which is what one CPU process does; with GPU training the loaders' workers overlap the reading, not
the frozen encoders (they run on the GPU inside the step either way).
"""

from __future__ import annotations

import functools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any
from unittest import mock

import torch

from bench import stats
from bench.models import SD15_UNET, TINY_SD15_UNET, TINY_VIT, VIT_H, Sizes, build_clip_vision, build_unet, init_module
from bench.report import Section, Target
from bench.step import cpu_share_options, round_reporter

# SD1.5's VAE (comfy/sd.py's default AutoencoderKL) and a narrow one with the same layout for --smoke.
SD_VAE = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
          "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
TINY_VAE = {**SD_VAE, "ch": 32, "ch_mult": [1, 1, 1, 1], "num_res_blocks": 1}  # GroupNorm needs 32 channels
TINY_CLIP_L = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3}

SPECS = {  # per Sizes.name: models, resolution, batch, rounds
    "full": {"unet": SD15_UNET, "vae": SD_VAE, "clip_l": None, "vit": VIT_H, "adapter": {}, "lora_rank": 128,
             "resolution": 512, "batch": 1, "rounds": 2, "portraits": 4},
    "smoke": {"unet": TINY_SD15_UNET, "vae": TINY_VAE, "clip_l": TINY_CLIP_L, "vit": TINY_VIT,
              "adapter": {"facial_dim": 64, "facial_depth": 2, "id_depth": 2}, "lora_rank": 4,
              "resolution": 128, "batch": 1, "rounds": 1, "portraits": 4},
}
VARIANTS = ("on the fly", "cached")


def build_host(env: Any, spec: dict[str, Any], folder: Path):
    """A ``ComfyHost`` whose loaders are handed random in-memory models instead of reading files."""
    import comfy.sd
    import comfy.supported_models
    from comfy.ldm.models.autoencoder import AutoencoderKL

    from train.config import ModelConfig
    from train.hosts.comfy import ComfyHost

    unet = build_unet(spec["unet"])
    options = {"dtype": torch.float32, **({"clip_l_model_config": spec["clip_l"]} if spec["clip_l"] else {})}
    clip = comfy.sd.CLIP(target=comfy.supported_models.SD15({}).clip_target(), model_options=options)
    init_module(clip.cond_stage_model, 4)
    vae_params = {"ddconfig": spec["vae"], "embed_dim": 4}
    vae = comfy.sd.VAE(sd=init_module(AutoencoderKL(**vae_params), 5).state_dict(), config={"params": vae_params})
    clip_vision = build_clip_vision(spec["vit"], folder)
    model = ModelConfig(comfyui_path=str(env.root), checkpoint="(random)", clip_vision="(random)",
                        lora_rank=spec["lora_rank"], adapter_dims=spec["adapter"])
    with mock.patch("comfy.sd.load_checkpoint_guess_config", lambda *a, **k: (unet, clip, vae, None)), \
            mock.patch("train.hosts.comfy.load_clip_vision", lambda _: clip_vision):
        host = ComfyHost(model, env.root, torch.device("cpu"), torch.float32)
    return host, model


class TrainingRig:
    def __init__(self, comfy: Any, sizes: Sizes, folder: Path, progress: Callable[[str], None]) -> None:
        from consistentid_core.data import FGIDDataset, ResumableBatchSampler, SampleOptions, collate
        from torch.utils.data import DataLoader

        from train.cache import build_cache
        from train.config import load_config
        from train.fit import build_adapter, load_records
        from train.shards import ShardStream
        from train.step import LossConfig, TrainingModule
        from train.synthetic import write_synthetic_set

        spec = self.spec = SPECS[sizes.name]
        started = time.perf_counter()
        host, model = build_host(comfy, spec, folder / "models")
        data = write_synthetic_set(folder / "data", count=spec["portraits"], identities=4, size=spec["resolution"])
        config = load_config(None, [f"data.json={data}", f"data.resolution={spec['resolution']}", "data.cache=null",
                                    f"train.batch_size={spec['batch']}", "model.checkpoint=(random)", "model.clip_vision=(random)",
                                    f"data.image_root={data.parent / 'resize_IMG'}", f"data.parsing_root={data.parent / 'parsing_mask_IMG'}",
                                    f"data.id_embedding_root={data.parent / 'faceID'}"])
        config.model = model
        progress(f"  built {sizes.name}-size UNet, VAE, CLIP-L, CLIP vision in {time.perf_counter() - started:.0f} s")
        started = time.perf_counter()
        cache = folder / "cache"
        build_cache(config, cache, shard_size=4, dtype="float16", batch_size=spec["batch"], host=host)
        self.cache_seconds = time.perf_counter() - started
        progress(f"  wrote the feature cache ({spec['portraits']} samples) in {self.cache_seconds:.0f} s")
        self.cache_bytes = sum(p.stat().st_size for p in cache.glob("shard-*.tar")) / spec["portraits"]
        torch.manual_seed(0)
        adapter = build_adapter(config, host)
        self.module = TrainingModule(adapter, host, LossConfig())
        self.optimizer = torch.optim.AdamW(adapter.parameters(), lr=1e-5)
        records, roots = load_records(config)
        dataset = FGIDDataset(records, roots, host.tokenizer, SampleOptions(size=spec["resolution"]), drop_prob=0.1)
        sampler = ResumableBatchSampler(len(dataset), spec["batch"])
        self.streams = {
            "on the fly": iter(DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=0)),
            "cached": iter(ShardStream(cache, spec["batch"], drop_prob=0.1)),
        }
        self.steps = 0

    def step(self, name: str) -> None:
        from train.step import step_generator

        batch = next(self.streams[name])
        result = self.module(batch, step_generator(0, self.steps, 0, 0, torch.device("cpu")))
        result["loss"].backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps += 1


def run(comfy: Any, sizes: Sizes, progress: Callable[[str], None] = print) -> list[Section]:
    with tempfile.TemporaryDirectory(prefix="consistentid-train-bench-") as tmp:
        rig = TrainingRig(comfy, sizes, Path(tmp), progress)
        rounds = SPECS[sizes.name]["rounds"]
        progress(f"  {', '.join(VARIANTS)}: {rounds} rounds, batch {rig.spec['batch']} at {rig.spec['resolution']} px")
        shares: list[float] = []
        samples = stats.run_interleaved(
            {name: functools.partial(rig.step, name) for name in VARIANTS}, rounds, warmup=1,
            on_round=round_reporter(progress, shares), **cpu_share_options(shares, rounds),
        )
        section = training_section(samples, stats.quiet_rounds(shares), rig.spec, rig.cache_bytes, rig.cache_seconds)
        section.data["cpu_shares"] = shares
        return [section]


def training_section(samples: dict[str, list[float]], quiet: list[int], spec: dict[str, Any], cache_bytes: float, cache_seconds: float) -> Section:
    batch = spec["batch"]
    speedup = stats.ratio(samples, "on the fly", "cached", quiet)
    rows = []
    for name in VARIANTS:
        seconds = stats.median_of(samples[name], quiet)
        rows.append([name, f"{len(quiet)}/{len(samples[name])}", seconds, batch / seconds,
                     stats.ratio(samples, "on the fly", name, quiet), stats.fastest_ratio(samples, "on the fly", name, quiet)])
    notes = [
        f"One optimizer step per call (load batch, forward, backward, AdamW), batch {batch} at {spec['resolution']} px, "
        f"SD1.5 ComfyUI UNet with a fresh adapter; the synthetic set ({spec['portraits']} portraits, 5 facial regions each).",
        f"Cache: float16, {cache_bytes / 1e6:.2f} MB per sample; writing it took {cache_seconds:.0f} s for {spec['portraits']} samples "
        "(one encoder pass each, what the on-the-fly path pays every step).",
        "'speed-up' = median over quiet rounds of (on-the-fly s / cached s) = cached samples/s ÷ on-the-fly samples/s; "
        "'fastest' = ratio of the fastest runs.",
    ]
    return Section(
        name="training",
        title="Training throughput: feature cache vs encoding on the fly (same model, interleaved)",
        columns=["input", "quiet", "s/step", "samples/s", "speed-up", "speed-up fastest"],
        rows=rows,
        targets=[Target("training samples/s: cached / on the fly", speedup, 2.0, ">=")],
        notes=notes,
        data={"samples": samples, "quiet": quiet, "spec": {k: v for k, v in spec.items() if k in ("resolution", "batch", "rounds", "portraits")}},
    )
