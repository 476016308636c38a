"""Metrics (``metrics.jsonl`` always, TensorBoard/W&B through accelerate's trackers) and sample grids."""

from __future__ import annotations

import importlib.util
import json
import logging
import netrc
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import torch

logger = logging.getLogger("train.fit")

METRICS_FILE = "metrics.jsonl"
VALIDATION_FILE = "validation.jsonl"
LOSS_NAMES = ("loss", "noise_loss", "facial_loss")


def tracker_names(log_with: str) -> list[str]:
    """accelerate's trackers for ``train.log_with``.

    ``auto`` (the default) logs to TensorBoard when it is installed and to W&B when it is installed
    and can start without asking for a key (:func:`wandb_unready`), so installing W&B is enough to
    get the curves there. A tracker named explicitly must be installed: a run that was asked for W&B
    and silently wrote only metrics.jsonl would be found out hours later.
    """
    from .config import ConfigError

    if log_with == "none":
        return []
    if log_with == "auto":
        names = ["tensorboard"] if _has_tensorboard() else []
        reason = wandb_unready()
        if reason is None:
            names.append("wandb")
        elif importlib.util.find_spec("wandb") is not None:
            logger.info("not logging to W&B: %s", reason)
        return names
    installed = _has_tensorboard() if log_with == "tensorboard" else importlib.util.find_spec("wandb") is not None
    if not installed:
        raise ConfigError(f"train.log_with is {log_with} but {log_with} is not installed: pip install {log_with}, or set log_with: auto")
    return [log_with]


def wandb_unready() -> str | None:
    """Why W&B would stop to ask for an API key (or is off), ``None`` when it can log unattended.

    It can when a key is in the environment or in the netrc file that ``wandb login`` writes for the
    server in use, or when ``WANDB_MODE`` is ``offline`` (runs kept under ``output_dir/wandb`` for
    ``wandb sync``).
    """
    if importlib.util.find_spec("wandb") is None:
        return "wandb is not installed"
    mode = os.environ.get("WANDB_MODE", "").lower()
    if mode == "disabled":
        return "WANDB_MODE is disabled"
    if mode in ("offline", "dryrun") or os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return None
    host = urlsplit(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).netloc
    candidates = [Path(os.environ["NETRC"]).expanduser()] if os.environ.get("NETRC") else [Path("~/.netrc").expanduser(), Path("~/_netrc").expanduser()]
    for path in candidates:
        try:
            if netrc.netrc(path).authenticators(host):
                return None
        except (OSError, netrc.NetrcParseError):
            continue
    return f"no W&B key for {host} (run wandb login, set WANDB_API_KEY, or WANDB_MODE=offline)"


def _has_tensorboard() -> bool:
    return importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None


class MetricsLogger:
    """Averages losses over ``log_every`` steps and over processes; writes them on the main process."""

    def __init__(self, accelerator: Any, output_dir: Path, config: Any) -> None:
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.config = config
        self.every = config.train.log_every
        self.window = torch.zeros(len(LOSS_NAMES), device=accelerator.device)
        self.count = 0
        self.seconds = 0.0
        self.started = time.time()
        if accelerator.is_main_process and accelerator.log_with:
            accelerator.init_trackers("consistentid", config={k: str(v) for k, v in _flat(config.to_dict()).items()},
                                      init_kwargs={"wandb": {"dir": str(output_dir)}})  # read only by a W&B tracker

    def step(self, step: int, losses: torch.Tensor, grad_norm: float, lr: float, seconds: float, state: dict) -> dict[str, float]:
        """Collective on log steps (every process must call it every step)."""
        self.window += losses.detach()
        self.count += 1
        self.seconds += seconds
        if step % self.every and step != self.config.train.max_steps:
            return {}
        mean = self.accelerator.reduce(self.window / self.count, reduction="mean")
        batch = self.config.train.batch_size * self.config.train.gradient_accumulation_steps * self.accelerator.num_processes
        record = {name: float(value) for name, value in zip(LOSS_NAMES, mean.tolist())}
        record.update(
            step=step,
            lr=lr,
            grad_norm=grad_norm,
            steps_per_second=self.count / self.seconds if self.seconds else 0.0,
            samples_per_second=batch * self.count / self.seconds if self.seconds else 0.0,
            skipped_steps=state["skipped_steps"],
            elapsed=time.time() - self.started,
        )
        self.window.zero_()
        self.count, self.seconds = 0, 0.0
        if self.accelerator.is_main_process:
            with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
            self.accelerator.log({f"train/{k}": v for k, v in record.items() if k != "step"}, step=step)
            logger.info(
                "step %d  loss %.4f (noise %.4f, facial %.4f)  lr %.2e  %.2f steps/s",
                step, record["loss"], record["noise_loss"], record["facial_loss"], lr, record["steps_per_second"],
            )
        return record

    def validation(self, step: int, values: dict[str, float]) -> None:
        """Main process: held-out metrics (``validation/...``) to validation.jsonl and the trackers."""
        with open(self.output_dir / VALIDATION_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps({"step": step, **values}) + "\n")
        self.accelerator.log(values, step=step)
        logger.info("step %d  validation: %s", step, "  ".join(f"{k.removeprefix('validation/')} {v:.4f}" for k, v in values.items()))

    def sample(self, module: Any, records: list, roots: Any, step: int) -> Path:
        from .sampling import sample_grid

        train = self.config.train
        chosen = [records[i % len(records)] for i in train.sample_rows]
        grid = sample_grid(module, chosen, roots, train.sample_prompts, self.config.data.resolution, train.sample_steps, train.sample_guidance, train.seed)
        folder = self.output_dir / "samples"
        folder.mkdir(exist_ok=True)
        path = folder / f"step-{step:08d}.png"
        grid.save(path)
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({"samples": np.asarray(grid)[None]}, step=step, dataformats="NHWC")
            elif tracker.name == "wandb":
                tracker.log_images({"samples": [np.asarray(grid)]}, step=step)
        logger.info("sample grid %s", path)
        return path

    def close(self) -> None:
        self.accelerator.end_training()


def _flat(values: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def read_metrics(output_dir: str | Path, name: str = METRICS_FILE) -> list[dict[str, Any]]:
    """Records of metrics.jsonl (or ``name``, e.g. validation.jsonl)."""
    path = Path(output_dir) / name
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()] if path.is_file() else []
