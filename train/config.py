"""Training configuration: a YAML or JSON file of three sections, with documented defaults.

Every key, its default and its meaning is in the dataclasses below (``docs/TRAINING.md`` lists them
too). Unknown keys are errors, so a typo never silently trains with a default. Values can be
overridden on the command line: ``--set train.max_steps=100 --set data.resolution=256``.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """The configuration file or an override is invalid; the message names the key."""


@dataclass
class ModelConfig:
    comfyui_path: str | None = None
    """ComfyUI checkout to import (default: the ``COMFYUI_PATH`` environment variable)."""
    checkpoint: str | None = None
    """Single-file SD1.5 or SDXL checkpoint (UNet + VAE + text encoder), as in ComfyUI's models/checkpoints."""
    clip_vision: str | None = None
    """CLIP-ViT-H-14 (laion2B-s32B-b79K) vision model file, as in ComfyUI's models/clip_vision."""
    clip_vision_config: str | None = None
    """JSON config for a CLIP vision file ComfyUI cannot identify by itself (custom or test towers)."""
    setup_hooks: list[str] = field(default_factory=list)
    """``module:function`` callables run after ComfyUI is imported, before loading (e.g. register model configs)."""
    init_from: str | None = None
    """ConsistentID release/export to fine-tune, or an IP-Adapter-FaceID-Plus SD1.5 file (ip-adapter-faceid-plus_sd15.bin, the paper's init: ID projection and ID k/v where shapes match); ``null`` = fresh adapter, ID k/v copied from the UNet's k/v."""
    pairing: str = "original"
    """Facial token ↔ region crop pairing: ``original`` (the release's: ears token gets the eye crop, left eye and upper lip only) or ``corrected`` (each token its own part, both eyes, both lips, both ears); stored in the exported adapter, which the nodes follow."""
    lora_rank: int = 128
    """LoRA rank of every attention layer (the release: 128)."""
    num_tokens: int = 4
    """ID tokens (the release: 4)."""
    adapter_dims: dict[str, Any] = field(default_factory=dict)
    """Extra ``ConsistentIDAdapter.create`` arguments (test-size models); normally empty."""


@dataclass
class DataConfig:
    json: str = ""
    """FGID JSON/JSONL file (``python -m train.prepare`` writes one; the released FGID JSON works as is)."""
    image_root: str | None = None
    """Folder the image paths are relative to (default: the JSON's folder)."""
    parsing_root: str | None = None
    """Folder of the parsing maps (default: image_root)."""
    id_embedding_root: str | None = None
    """Folder of the ID embeddings (default: image_root)."""
    image_key: str | None = None
    """JSON key of the image path (default: resize_IMG, then IMG, then origin_IMG)."""
    face_caption_key: str | None = None
    """JSON key of the face caption (default: vqa_llva_more_face_detail, vqa_llva_facial, vqa_llva_face_caption)."""
    resolution: int = 512
    """Training image side (shortest side resized, then centre-cropped)."""
    drop_prob: float = 0.1
    """Probability of dropping text and whole-image CLIP input (classifier-free guidance), as the original."""
    clip_image: str = "image"
    """Whole-image CLIP input of the ID projection: ``image`` (the original) or ``without_background``."""
    missing_id_embedding: str = "zeros"
    """Rows without an ID embedding: ``zeros`` (the original), ``skip`` (drop the row) or ``error``."""
    check_files: bool = True
    """Check at start-up that every row's files exist; rows with missing files are dropped and listed."""
    num_workers: int = 2
    """DataLoader worker processes per training process (reading the feature cache uses at most 1)."""
    identity_key: str = "identity"
    """JSON key naming the person a row shows (validation split); rows without it count as their own identity."""
    validation_identities: float = 0
    """Identities held out for validation: a count (≥ 1) or a fraction (< 1); 0 = no validation."""
    validation_seed: int = 0
    """Seed of the identity split (kept apart from train.seed so the split and the feature cache stay put)."""
    cache: str | None = "auto"
    """Feature cache folder (``python -m train.cache``); ``auto``: ``<json folder>/feature_cache`` when present; ``null``: never."""
    shuffle_buffer: int = 64
    """Samples held for shuffling within a cache shard (memory: about 4 MB each at 512 px, float16)."""


@dataclass
class TrainConfig:
    output_dir: str = "runs/consistentid"
    """Checkpoints, logs, sample grids and the exported adapter go here."""
    seed: int = 0
    """Data order, drops, noise and timesteps; per micro-batch from SeedSequence(seed, step, process, micro-step)."""
    deterministic: bool = False
    """Set torch's deterministic flags (use_deterministic_algorithms, cuDNN, cuBLAS workspace); see docs/TRAINING.md for where bit-for-bit resume holds."""
    batch_size: int = 8
    """Per process (GPU). Effective batch = batch_size × gradient_accumulation_steps × processes."""
    gradient_accumulation_steps: int = 1
    max_steps: int = 10000
    """Optimizer steps."""
    learning_rate: float = 1e-4
    weight_decay: float = 1e-2
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    lr_scheduler: str = "constant"
    """``constant`` (the original), ``cosine`` or ``linear`` (both decay to 0 at max_steps)."""
    warmup_steps: int = 0
    max_grad_norm: float | None = 1.0
    """Gradient clipping (``null``: off; the original did not clip)."""
    mixed_precision: str = "no"
    """``no``, ``fp16`` or ``bf16``: autocast for the step; frozen models stored in that dtype on GPU."""
    gradient_checkpointing: bool = False
    """Recompute UNet activations in the backward pass (less memory, ~30 % slower)."""
    facial_weight: float = 0.01
    mask_loss_prob: float = 0.5
    localization_layers: int = 5
    """Middle attention groups used by the localization loss (SD1.5: 5, SDXL: 3 in the original)."""
    localization_attention: str = "attn2"
    """``attn2``: cross-attention maps (the paper); ``attn1_original``: the original code's self-attention maps."""
    max_nonfinite_steps: int = 10
    """Consecutive steps with a NaN/inf loss or gradient (on any process) that are skipped before training stops; fp16 loss-scale overflows do not count."""
    ema_decay: float = 0.0
    """EMA of the adapter weights (e.g. 0.9999; 0: off). Saved in checkpoints; exports and the final adapter use it."""
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    resume: str | None = "auto"
    """``auto``: continue from the latest checkpoint in output_dir if any; a path; or ``null``."""
    on_shape_change: str = "refuse"
    """Resuming with other processes/batch size/accumulation/data size: ``refuse`` or ``remap`` (same epoch, next unused batch)."""
    log_every: int = 10
    log_with: str = "auto"
    """``auto`` (TensorBoard if installed, W&B if installed and logged in or ``WANDB_MODE=offline``), ``tensorboard``, ``wandb``, ``none`` (metrics.jsonl is always written)."""
    sample_every: int = 500
    """Sample grid every N steps (0: never)."""
    sample_prompts: list[str] = field(default_factory=lambda: ["a photo of a person", "a person wearing a red hat, oil painting"])
    sample_rows: list[int] = field(default_factory=lambda: [0, 1])
    """Training rows whose identities appear in the sample grids."""
    sample_steps: int = 20
    sample_guidance: float = 5.0
    validation_every: int = 500
    """Validation loss (and the FaceSim/CLIP-T grid) every N steps, when identities are held out."""
    validation_samples: int = 64
    """Held-out samples in the validation loss (fixed noise and timesteps, no drop)."""
    validation_grid: int = 4
    """Held-out identities in the generated prompt × identity grid scored with FaceSim/CLIP-T (0: no grid)."""
    validation_prompts: list[str] = field(default_factory=lambda: ["a photo of a person", "a person wearing a red hat, oil painting"])
    validation_insightface_root: str | None = None
    """Folder with models/<pack>/*.onnx for FaceSim (as ``train.evaluate score --insightface-root``); unset: no FaceSim."""
    validation_insightface_name: str = "antelopev2"
    validation_clip_model: str | None = None
    """transformers CLIP folder for CLIP-T (as ``train.evaluate score --clip-model``); unset: no CLIP-T."""
    validation_weights: str = "ema"
    """Weights validation scores and ``best/`` keeps: ``ema`` (the EMA when ``ema_decay`` is on, as the final adapter and the export; else the live weights) or ``live``."""
    best_metric: str | None = "validation/loss"
    """Metric picking ``output_dir/best/`` (``validation/loss`` lowest; ``validation/FaceSim``, ``validation/CLIP-T`` highest; null: off)."""
    ddp_find_unused_parameters: bool = True
    """Needed when a batch has no facial token (the FacialEncoder then gets no gradient)."""


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def validate(self) -> None:
        choices = {
            ("model", "pairing"): ("original", "corrected"),
            ("train", "on_shape_change"): ("refuse", "remap"),
            ("data", "clip_image"): ("image", "without_background"),
            ("data", "missing_id_embedding"): ("zeros", "skip", "error"),
            ("train", "lr_scheduler"): ("constant", "cosine", "linear"),
            ("train", "mixed_precision"): ("no", "fp16", "bf16"),
            ("train", "localization_attention"): ("attn2", "attn1_original"),
            ("train", "log_with"): ("auto", "tensorboard", "wandb", "none"),
            ("train", "validation_weights"): ("ema", "live"),
            ("train", "best_metric"): ("validation/loss", "validation/FaceSim", "validation/CLIP-T", None),
        }
        for (section, key), allowed in choices.items():
            value = getattr(getattr(self, section), key)
            if value not in allowed:
                raise ConfigError(f"{section}.{key} must be one of {', '.join(str(a) for a in allowed)}; got {value!r}")
        if not self.data.json:
            raise ConfigError("data.json is required: the FGID JSON file to train on")
        if not (self.model.checkpoint and self.model.clip_vision):
            raise ConfigError("model.checkpoint and model.clip_vision are required (ComfyUI model files)")
        if self.train.seed < 0:
            raise ConfigError("train.seed must be non-negative")
        if not 0.0 <= self.train.ema_decay < 1.0:
            raise ConfigError("train.ema_decay must be in [0, 1): 0 turns the EMA off")
        for key in ("batch_size", "gradient_accumulation_steps", "max_steps", "checkpoint_every", "log_every", "validation_every"):
            if getattr(self.train, key) < 1:
                raise ConfigError(f"train.{key} must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def sample_options(config: Config) -> Any:
    """The dataset's ``SampleOptions`` for this config: training, validation and the feature cache alike."""
    from consistentid_core.data import SampleOptions

    data = config.data
    return SampleOptions(
        size=data.resolution, missing_id_embedding="error" if data.missing_id_embedding == "error" else "zeros",
        pairing=config.model.pairing,
    )


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Numbers written as YAML strings ("1e-4" is a string in YAML 1.1) become numbers; wrong types are errors."""
    allowed = typing.get_args(annotation) if typing.get_origin(annotation) in (typing.Union, types.UnionType) else (annotation,)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{where} may not be null")
    for kind in (bool, int, float, str):
        if kind not in allowed:
            continue
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            return value
        if kind is float and isinstance(value, (int, str)) and not isinstance(value, bool):
            try:
                return float(value)
            except ValueError:
                pass
        if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    if any(typing.get_origin(a) in (list, tuple, dict) for a in allowed):
        return value
    names = ", ".join(getattr(a, "__name__", str(a)) for a in allowed)
    raise ConfigError(f"{where} must be {names}; got {value!r}")


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(values).__name__}")
    known = {f.name: f for f in fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) in {where}: {', '.join(unknown)} (valid: {', '.join(known)})")
    kwargs = {}
    for name, value in values.items():
        nested = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}.get(name) if cls is Config else None
        if nested is not None:
            value = _build(nested, value or {}, name)
        elif name == "adam_betas":
            value = tuple(float(v) for v in value)
        else:
            value = _coerce(value, hints[name], f"{where}.{name}" if where != "the config" else name)
        kwargs[name] = value
    return cls(**kwargs)


def _set(raw: dict[str, Any], assignment: str) -> None:
    key, sep, text = assignment.partition("=")
    parts = key.strip().split(".")
    if not sep or len(parts) != 2:
        raise ConfigError(f"--set expects section.key=value, got {assignment!r}")
    raw.setdefault(parts[0], {})[parts[1]] = yaml.safe_load(text)


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Read a YAML/JSON config (or start from the defaults), apply ``section.key=value`` overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text(encoding="utf-8")
        try:
            raw = (json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)) or {}
        except (json.JSONDecodeError, yaml.YAMLError) as error:
            raise ConfigError(f"{path} is not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {error}") from error
    for assignment in overrides:
        _set(raw, assignment)
    config = _build(Config, raw, "the config")
    config.validate()
    return config


def describe_defaults() -> str:
    """Markdown reference of every key with its default and doc (kept in sync with docs/TRAINING.md)."""
    import ast
    import inspect

    lines = []
    for section, cls in (("model", ModelConfig), ("data", DataConfig), ("train", TrainConfig)):
        docs: dict[str, str] = {}
        tree = ast.parse(inspect.getsource(cls))
        body = tree.body[0].body
        for node, following in zip(body, body[1:] + [None]):
            if isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant):
                docs[node.target.id] = " ".join(str(following.value.value).split())
        lines += [f"### `{section}`", "", "| key | default | meaning |", "| --- | --- | --- |"]
        defaults = cls()
        for f in fields(cls):
            lines.append(f"| `{f.name}` | `{json.dumps(getattr(defaults, f.name))}` | {docs.get(f.name, '')} |")
        lines.append("")
    return "\n".join(lines)
