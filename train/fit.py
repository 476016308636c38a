"""``python -m train.fit --config run.yaml``: train (or fine-tune) a ConsistentID adapter.

One GPU or a laptop: ``python -m train.fit --config run.yaml``. Several GPUs or nodes: the same
command under ``accelerate launch`` (DDP through Hugging Face accelerate); ``docs/TRAINING.md`` has
the cluster recipes. Run it again with the same output folder and it resumes from the latest
checkpoint (bit for bit where docs/TRAINING.md says so); a run of another shape is refused or
re-mapped (``train.on_shape_change``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from consistentid_core import ConsistentIDAdapter, ModelMismatch
from consistentid_core.data import (
    DataRoots,
    FGIDDataset,
    KeyChoice,
    ResumableBatchSampler,
    check_files,
    collate,
    read_fgid,
)

from .attention_patch import init_id_key_value_from_base
from .cache import open_cache
from .checkpointing import find_checkpoint, load_checkpoint, read_trainer_state, save_checkpoint
from .config import Config, ConfigError, load_config, sample_options
from .ema import EMA_FILE, AdapterEMA
from .export import adapter_from_training_state
from .hosts import Host, make_host
from .init_from import init_from_ipadapter_faceid, is_ipadapter_faceid
from .replicas import check_replicas
from .run_shape import RunShape, changes, resume_start_batch
from .shards import ShardStream, cache_loader
from .split import split_by_identity
from .step import LossConfig, TrainingModule, step_generator
from .tracking import MetricsLogger, tracker_names
from .update import Outcome, apply_update
from .validation import Validator

logger = logging.getLogger("train.fit")

FINAL_ADAPTER = "consistentid_adapter.safetensors"
PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def data_roots(config: Config) -> DataRoots:
    base = Path(config.data.json).parent
    images = Path(config.data.image_root) if config.data.image_root else base
    return DataRoots.of(images, config.data.parsing_root, config.data.id_embedding_root)


def keep_existing(records: list, roots: DataRoots, problems: list | None = None) -> list:
    """The rows whose files exist; the others are added to ``problems`` (or logged)."""
    found = check_files(records, roots)
    bad = {p.index for p in found}
    if problems is not None:
        problems.extend(found)
    elif found:
        logger.warning("%d rows dropped, files missing; first: %s", len(found), found[0])
    return [r for r in records if r.index not in bad]


def load_records(config: Config, check: bool = True) -> tuple[list, DataRoots]:
    """Valid rows of the training JSON; rejected rows are logged with their reasons.

    ``check=False`` skips the per-file existence check (rows read from the feature cache need none).
    """
    index = read_fgid(config.data.json, KeyChoice(config.data.image_key, config.data.face_caption_key))
    roots = data_roots(config)
    records = index.records
    if config.data.missing_id_embedding == "skip":
        without = [r for r in records if r.id_embedding is None]
        records = [r for r in records if r.id_embedding is not None]
        if without:
            logger.info("%d rows without an ID embedding skipped (data.missing_id_embedding: skip)", len(without))
    if check and config.data.check_files:
        records = keep_existing(records, roots, index.problems)
    logger.info(index.summary())
    if not records:
        raise ConfigError(f"no usable training rows in {config.data.json}")
    return records, roots


def build_adapter(config: Config, host: Host) -> ConsistentIDAdapter:
    """A ConsistentID file to fine-tune, or a fresh adapter (optionally seeded from IP-Adapter-FaceID-Plus)."""
    from_ipadapter = bool(config.model.init_from) and is_ipadapter_faceid(config.model.init_from)
    if config.model.init_from and not from_ipadapter:
        adapter = ConsistentIDAdapter.load(config.model.init_from, dtype=torch.float32)
        if adapter.base_model != host.base_model:
            raise ModelMismatch(f"{config.model.init_from} is a {adapter.base_model} adapter, the checkpoint is {host.base_model}")
        if adapter.pairing != config.model.pairing:
            logger.warning("%s was trained with %s pairing; fine-tuning it with %s pairing (model.pairing)",
                           config.model.init_from, adapter.pairing, config.model.pairing)
        adapter.pairing = config.model.pairing
        return adapter
    dims = {**host.adapter_dims, **config.model.adapter_dims}
    adapter = ConsistentIDAdapter.create(host.base_model, lora_rank=config.model.lora_rank, num_tokens=config.model.num_tokens, **dims)
    init_id_key_value_from_base(adapter, host.base_weights())
    adapter.pairing = config.model.pairing
    if from_ipadapter:
        init_from_ipadapter_faceid(adapter, config.model.init_from)
    return adapter


def resume_position(config: Config, resume_from: Path | None, shape: RunShape, cached: bool) -> int:
    """Batches this process skips when resuming (``run_shape``); the feature cache's stream is never re-mapped."""
    if resume_from is None:
        return 0
    saved = read_trainer_state(resume_from)
    saved_shape = RunShape.from_dict(saved["shape"]) if "shape" in saved else None
    if cached and saved_shape is not None and changes(saved_shape, shape):
        raise ConfigError(
            f"{resume_from} was written by a run of another shape ({', '.join(changes(saved_shape, shape))}); the "
            "feature cache's shard stream cannot be re-mapped: restore the old shape, or set data.cache: null to re-map"
        )
    return resume_start_batch(saved_shape, shape, saved["state"]["step"], config.train.on_shape_change, str(resume_from))


def make_ema(config: Config, module: torch.nn.Module, resume_from: Path | None) -> AdapterEMA | None:
    """The EMA of the adapter weights if ``train.ema_decay`` is on, restored from the checkpoint."""
    if not config.train.ema_decay:
        return None
    ema = AdapterEMA(module, config.train.ema_decay)
    if resume_from is not None:
        if (resume_from / EMA_FILE).is_file():
            from safetensors.torch import load_file

            ema.load_state_dict(load_file(str(resume_from / EMA_FILE)))
        else:
            logger.warning("%s has no %s: the EMA starts from the resumed weights", resume_from, EMA_FILE)
    return ema


def lr_lambda(config: Config):
    warmup, total, kind = config.train.warmup_steps, config.train.max_steps, config.train.lr_scheduler

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return factor


def make_accelerator(config: Config):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    trackers = tracker_names(config.train.log_with)
    return Accelerator(
        cpu=not torch.cuda.is_available(),  # several CPU processes (torchrun/accelerate launch) then use gloo
        mixed_precision=config.train.mixed_precision,
        log_with=trackers or None,
        project_config=ProjectConfiguration(project_dir=config.train.output_dir, logging_dir=str(Path(config.train.output_dir) / "logs")),
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=config.train.ddp_find_unused_parameters)],
    )


def set_deterministic(enabled: bool) -> None:
    """torch's reproducibility switches (https://pytorch.org/docs/stable/notes/randomness.html).

    Ops without a deterministic kernel warn instead of failing (``warn_only``): a run that logs such a
    warning is not bit-for-bit reproducible on that device, and the log says which op.
    """
    if not enabled:
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before the first cuBLAS call
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False


def run(config: Config) -> dict[str, Any]:
    """Train according to ``config``; returns a summary (last metrics, steps, checkpoint)."""
    from accelerate.utils import set_seed

    set_deterministic(config.train.deterministic)
    accelerator = make_accelerator(config)
    if not accelerator.is_main_process:
        logging.getLogger("train").setLevel(logging.WARNING)
    out = Path(config.train.output_dir)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=1), encoding="utf-8")
    set_seed(config.train.seed)
    resume_from = find_checkpoint(out, config.train.resume)
    frozen_dtype = PRECISION_DTYPES[config.train.mixed_precision] if accelerator.device.type == "cuda" else torch.float32
    host = make_host(config.model, accelerator.device, frozen_dtype, config.train.gradient_checkpointing)
    records, roots = load_records(config, check=False)
    split = split_by_identity(records, config.data.validation_identities, config.data.validation_seed)
    cache = open_cache(config, host.base_model, split)
    if config.data.check_files:  # rows read from the feature cache need no files
        held_out = keep_existing(split.held_out, roots)
        records = split.train if cache is not None else keep_existing(split.train, roots)
    else:
        held_out, records = split.held_out, split.train
    if not records:
        raise ConfigError(f"no usable training rows in {config.data.json}")
    logger.info("%d training rows, %d held-out rows of %d identities", len(records), len(held_out), len(split.held_out_identities))
    shape = RunShape(accelerator.num_processes, config.train.batch_size, config.train.gradient_accumulation_steps, config.train.seed, len(records))
    start_batch = resume_position(config, resume_from, shape, cache is not None)
    adapter = build_adapter(config, host).to(accelerator.device)
    losses = LossConfig(
        config.train.facial_weight, config.train.mask_loss_prob, config.train.localization_layers,
        config.train.localization_attention, config.data.clip_image,
    )
    module = TrainingModule(adapter, host, losses)
    optimizer = torch.optim.AdamW(
        adapter.parameters(), lr=config.train.learning_rate, betas=tuple(config.train.adam_betas),
        eps=config.train.adam_epsilon, weight_decay=config.train.weight_decay,
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(config))
    module, optimizer = accelerator.prepare(module, optimizer)
    accelerator.register_for_checkpointing(scheduler)

    state = {"step": 0, "skipped_steps": 0, "consecutive_nonfinite": 0, "scaler_overflows": 0}
    if resume_from is not None:
        state.update(load_checkpoint(accelerator, resume_from)["state"])
        logger.info("resumed from %s at step %d", resume_from, state["step"])
    ema = make_ema(config, accelerator.unwrap_model(module), resume_from)
    accum = config.train.gradient_accumulation_steps
    pin = accelerator.device.type == "cuda"
    if cache is not None:
        stream = ShardStream(cache, config.train.batch_size, accelerator.process_index, accelerator.num_processes,
                             config.train.seed, start_batch, config.data.drop_prob, config.data.shuffle_buffer)
        loader = cache_loader(stream, config.data.num_workers, pin)
    else:
        dataset = FGIDDataset(
            records, roots, host.tokenizer,
            sample_options(config),
            drop_prob=config.data.drop_prob, seed=config.train.seed,
        )
        sampler = ResumableBatchSampler(
            len(dataset), config.train.batch_size, accelerator.num_processes, accelerator.process_index,
            seed=config.train.seed, start_batch=start_batch,
        )
        loader = DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=config.data.num_workers, pin_memory=pin)
    metrics = MetricsLogger(accelerator, out, config)
    validator = Validator(config, held_out, roots, host.tokenizer, out) if held_out else None
    batches = iter(loader)
    params = [p for p in adapter.parameters() if p.requires_grad]
    last: dict[str, float] = {}
    while state["step"] < config.train.max_steps:
        step = state["step"]
        started = time.perf_counter()
        totals = torch.zeros(3, device=accelerator.device)
        for micro in range(accum):
            batch = next(batches)
            sync = contextlib.nullcontext() if micro == accum - 1 else accelerator.no_sync(module)
            with sync:
                result = module(batch, step_generator(config.train.seed, step, accelerator.process_index, micro, accelerator.device))
                accelerator.backward(result["loss"] / accum)
            totals += torch.stack([result["loss"].detach().float(), result["noise_loss"].float(), result["facial_loss"].float()]) / accum
        update = apply_update(accelerator, optimizer, params, totals, config.train.max_grad_norm)
        scheduler.step()
        state["step"] = step + 1
        if ema is not None and update.outcome is Outcome.UPDATED:
            ema.update(accelerator.unwrap_model(module))
        state["skipped_steps"] += int(update.outcome is not Outcome.UPDATED)
        state["scaler_overflows"] += int(update.outcome is Outcome.OVERFLOW)
        state["consecutive_nonfinite"] = state["consecutive_nonfinite"] + 1 if update.failed else 0
        if update.outcome is Outcome.OVERFLOW:
            logger.info("step %d: fp16 loss-scale overflow; the GradScaler skipped the update and lowered its scale", step)
        if update.failed:
            logger.warning("step %d: non-finite loss or gradient on some process (local loss %s, grad norm %s); update skipped everywhere",
                           step, totals.tolist(), update.grad_norm)
            if state["consecutive_nonfinite"] > config.train.max_nonfinite_steps:
                raise RuntimeError(
                    f"{state['consecutive_nonfinite']} consecutive steps with NaN/inf; stopping. Lower the learning "
                    "rate, use bf16 instead of fp16, or resume from the last checkpoint."
                )
        last = metrics.step(state["step"], totals, update.grad_norm, scheduler.get_last_lr()[0], time.perf_counter() - started, state)
        if validator is not None and validator.due(state["step"]):
            scored = accelerator.unwrap_model(module)
            use_ema = ema is not None and config.train.validation_weights == "ema"
            with ema.swapped_in(scored) if use_ema else contextlib.nullcontext():
                validator.run(accelerator, scored, state["step"], metrics, weights="ema" if use_ema else "live")
        if state["step"] % config.train.checkpoint_every == 0 or state["step"] == config.train.max_steps:
            check_replicas(accelerator, module)
            save_checkpoint(
                accelerator, out, state["step"], {"state": state, "shape": shape.to_dict(), "config": config.to_dict()},
                config.train.keep_checkpoints, {EMA_FILE: ema.state_dict()} if ema is not None else None,
            )
        if config.train.sample_every and state["step"] % config.train.sample_every == 0 and accelerator.is_main_process:
            metrics.sample(accelerator.unwrap_model(module), records, roots, state["step"])
    if accelerator.is_main_process:
        final = adapter_from_training_state(ema.state_dict(), pairing=config.model.pairing) if ema is not None else accelerator.unwrap_model(module).adapter
        final.save(out / FINAL_ADAPTER)
        logger.info("adapter written to %s%s", out / FINAL_ADAPTER, " (EMA weights)" if ema is not None else "")
    digests = check_replicas(accelerator, module)
    accelerator.wait_for_everyone()
    metrics.close()
    return {
        "step": state["step"], "skipped_steps": state["skipped_steps"], "scaler_overflows": state["scaler_overflows"],
        "last": last, "output_dir": str(out), "replica_digests": digests,
    }


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    """The command line; returns the run's summary (``None`` for ``--print-defaults``)."""
    parser = argparse.ArgumentParser(prog="python -m train.fit", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", help="YAML or JSON training config (see docs/TRAINING.md)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--print-defaults", action="store_true", help="print every config key with its default and exit")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    if args.print_defaults:
        from .config import describe_defaults

        print(describe_defaults())
        return None
    if not args.config:
        parser.error("--config is required")
    try:
        config = load_config(args.config, args.set)
    except ConfigError as error:
        parser.error(str(error))
    try:
        summary = run(config)
    except ConfigError as error:
        parser.error(str(error))
    logger.info("done: %s", json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
