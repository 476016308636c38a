"""Validation during training, on identities the adapter never trains on (:mod:`train.split`).

Every ``train.validation_every`` steps:

* **validation loss**: the training loss on up to ``validation_samples`` held-out samples, without
  the text/image drop, with noise, timesteps and background coin fixed per batch (the same draws at
  every evaluation, so the curve moves only with the weights); split over the processes and averaged;
* **FaceSim / CLIP-T** on a fixed grid: the first ``validation_grid`` held-out identities (one
  reference photo each) × ``validation_prompts``, generated with the adapter being validated
  (:func:`train.sampling.generate`) and scored by :class:`train.evaluate.Scorers`, the code behind
  ``python -m train.evaluate score``; images go to ``output_dir/validation/step-XXXXXXXX/``;
* **which weights**: the EMA when ``train.ema_decay`` is on and ``validation_weights`` is ``ema`` (the
  default: the weights the final adapter and the export hold), else the live weights;
* **best adapter**: when ``best_metric`` improves, the adapter is written to
  ``output_dir/best/consistentid_adapter.safetensors`` (a file the nodes load) with ``best.json``.

Values go to ``validation.jsonl`` and to TensorBoard/W&B as ``validation/*`` (through
:class:`train.tracking.MetricsLogger`).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from consistentid_core.data import DataRoots, FGIDDataset, FGIDRecord, collate

from .config import Config, sample_options
from .split import identity_of

logger = logging.getLogger("train.validation")

BEST_FOLDER = "best"
BEST_ADAPTER = "consistentid_adapter.safetensors"
BEST_STATE = "best.json"
LOWER_IS_BETTER = {"validation/loss", "validation/noise_loss", "validation/facial_loss"}


def validation_generator(seed: int, batch: int, device: torch.device) -> torch.Generator:
    """Fixed draws for validation batch ``batch`` (independent of the training step)."""
    entropy = np.random.SeedSequence([seed, 0x7A11D, batch]).generate_state(2, dtype=np.uint32)
    return torch.Generator(device=device).manual_seed(int(entropy[0]) << 32 | int(entropy[1]))


def grid_records(records: Sequence[FGIDRecord], count: int) -> list[FGIDRecord]:
    """The first photo of each of the first ``count`` held-out identities (sorted by name)."""
    first: dict[str, FGIDRecord] = {}
    for record in records:
        first.setdefault(identity_of(record), record)
    return [first[name] for name in sorted(first)[:count]]


class BestCheckpoint:
    """Keeps ``output_dir/best/`` at the step where ``metric`` was best (survives resume via best.json)."""

    def __init__(self, output_dir: Path, metric: str | None) -> None:
        self.folder = output_dir / BEST_FOLDER
        self.metric = metric
        self.lower = metric in LOWER_IS_BETTER
        state = self.folder / BEST_STATE
        self.best: dict[str, Any] | None = json.loads(state.read_text(encoding="utf-8")) if state.is_file() else None
        if self.best is not None and self.best.get("metric") != metric:
            logger.info("best_metric changed from %s to %s; choosing anew", self.best.get("metric"), metric)
            self.best = None

    def improves(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value < self.best["value"] if self.lower else value > self.best["value"]

    def update(self, step: int, values: dict[str, float], adapter: Any, weights: str = "live") -> bool:
        """Main process only; ``weights`` (``live``/``ema``) says which ones ``adapter`` holds. True when this step became the best."""
        if self.metric is None or self.metric not in values or not self.improves(values[self.metric]):
            return False
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{BEST_ADAPTER}.{os.getpid()}.tmp.safetensors"
        adapter.save(tmp)
        os.replace(tmp, self.folder / BEST_ADAPTER)
        self.best = {"metric": self.metric, "value": values[self.metric], "step": step, "weights": weights, "values": values}
        state = self.folder / f".{BEST_STATE}.tmp"
        state.write_text(json.dumps(self.best, indent=1), encoding="utf-8")
        os.replace(state, self.folder / BEST_STATE)
        logger.info("best %s so far: %.4f at step %d → %s", self.metric, values[self.metric], step, self.folder / BEST_ADAPTER)
        return True


class Validator:
    """Held-out loss, the FaceSim/CLIP-T grid and the best adapter; ``run`` is collective."""

    def __init__(self, config: Config, records: Sequence[FGIDRecord], roots: DataRoots, tokenizer: Any, output_dir: Path) -> None:
        if not records:
            raise ValueError("no held-out rows to validate on")
        self.config = config
        self.roots = roots
        self.output_dir = output_dir
        train = config.train
        options = sample_options(config)
        self.dataset = FGIDDataset(list(records)[: train.validation_samples], roots, tokenizer, options, drop_prob=0.0)
        self.grid = grid_records(records, train.validation_grid)
        self.best = BestCheckpoint(output_dir, train.best_metric)
        self._scorers: Any = None

    def due(self, step: int) -> bool:
        return step % self.config.train.validation_every == 0 or step == self.config.train.max_steps

    def batches(self, rank: int, world_size: int) -> list[tuple[int, list[int]]]:
        """(batch number, dataset positions) of this process's share (batch numbers are global)."""
        size = self.config.train.batch_size
        numbered = [(b, list(range(start, min(start + size, len(self.dataset))))) for b, start in enumerate(range(0, len(self.dataset), size))]
        return numbered[rank::world_size]

    @torch.no_grad()
    def loss(self, module: Any, rank: int = 0, world_size: int = 1, reduce: Any = None) -> dict[str, float]:
        """Mean validation loss (and its parts) over every held-out sample used, all processes together."""
        device = module.host.device
        sums = torch.zeros(4, device=device)  # loss, noise, facial (sample-weighted), samples
        was_training = module.training
        module.eval()
        try:
            for number, positions in self.batches(rank, world_size):
                batch = collate([self.dataset[p] for p in positions])
                result = module(batch, validation_generator(self.config.train.seed, number, device))
                n = len(positions)
                sums += torch.stack([result["loss"].detach() * n, result["noise_loss"] * n, result["facial_loss"] * n, torch.tensor(float(n), device=device)])
        finally:
            module.train(was_training)
        if reduce is not None:
            sums = reduce(sums)
        total = float(sums[3])
        return {"validation/loss": float(sums[0]) / total, "validation/noise_loss": float(sums[1]) / total, "validation/facial_loss": float(sums[2]) / total}

    def scorers(self) -> Any:
        if self._scorers is None:
            from .evaluate import Scorers

            train = self.config.train
            self._scorers = Scorers(train.validation_insightface_root, train.validation_insightface_name, train.validation_clip_model)
            for metric in ("FaceSim", "CLIP-T"):
                if metric in self._scorers.skipped:
                    logger.info("validation %s off: %s", metric, self._scorers.skipped[metric])
        return self._scorers

    @torch.no_grad()
    def grid_scores(self, module: Any, step: int) -> dict[str, float]:
        """Generate the held-out identity × prompt grid and score it (FaceSim, CLIP-T); main process."""
        from .evaluate import summarise
        from .sampling import generate

        scorers = self.scorers()
        wanted = [m for m in ("FaceSim", "CLIP-T") if m in scorers.metrics]
        if not self.grid or not wanted:
            return {}
        train = self.config.train
        folder = self.output_dir / "validation" / f"step-{step:08d}"
        rows = []
        for record in self.grid:
            _, images = generate(module, record, self.roots, train.validation_prompts, self.config.data.resolution,
                                 train.sample_steps, train.sample_guidance, train.seed)
            identity = identity_of(record)
            target = folder / identity.replace("/", "_").replace(":", "_")
            target.mkdir(parents=True, exist_ok=True)
            for number, (prompt, image) in enumerate(zip(train.validation_prompts, images)):
                path = target / f"p{number:02d}.png"
                Image.fromarray((image.clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)).save(path)
                rows.append({"identity": identity, "reference": str(self.roots.image(record)), "prompt": prompt, "seed": train.seed, "image": str(path)})
        overall = summarise(scorers.score_rows(rows), wanted)["overall"]
        return {f"validation/{metric}": float(overall[metric]) for metric in wanted}

    def run(self, accelerator: Any, module: Any, step: int, metrics: Any, weights: str = "live") -> dict[str, float]:
        """Collective: every process computes its share of the loss; the main one does the grid.

        ``module`` is scored with the weights it holds; ``weights`` names them (``live`` or ``ema``) in best.json.
        """
        values = self.loss(module, accelerator.process_index, accelerator.num_processes, lambda t: accelerator.reduce(t, reduction="sum"))
        if accelerator.is_main_process:
            values.update(self.grid_scores(module, step))
            metrics.validation(step, values)
            self.best.update(step, values, module.adapter, weights)
        accelerator.wait_for_everyone()
        return values
