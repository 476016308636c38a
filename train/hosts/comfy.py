"""The real host: a ComfyUI single-file checkpoint, run by ComfyUI's own UNet, VAE, CLIP and CLIP vision.

* Loading: ``comfy.sd.load_checkpoint_guess_config`` (what Load Checkpoint does) and
  ``comfy.clip_vision.load`` (Load CLIP Vision), so any checkpoint ComfyUI can sample from trains.
* The adapter goes in through ComfyUI's patch API, the same keys the nodes use:
  ``ModelPatcher.set_model_patch_replace`` for the attention patches and
  ``ModelPatcher.add_weight_wrapper`` for the LoRA (as ComfyUI's own TrainLoraNode), then
  ``load_models_gpu(..., force_full_load=True)`` attaches them. Frozen weights never get gradients.
* The UNet is called as ``BaseModel._apply_model`` calls it, on DDPM-noised latents
  (√ᾱ·x₀ + √(1-ᾱ)·ε, which is ComfyUI's ``calculate_input`` of ``x₀ + σε``) at integer timesteps, and
  returns ε directly: the original's ``unet(noisy_latents, timesteps, embeds)``.

ComfyUI is imported from ``model.comfyui_path``/``COMFYUI_PATH`` by ``consistentid_cli.comfy_boot``
(its root first on ``sys.path``). Our package is loaded too, without the extra nodes: text and CLIP vision
are encoded by the nodes' own functions (``encode_token_ids``, ``clip_vision_hidden_states``).
Everything is built outside ComfyUI's executor, so no weight is an inference tensor (the pitfall of
training inside a node) and the frozen weights need no copies.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch

from consistentid_cli.comfy_boot import boot_comfyui
from consistentid_core import ModelMismatch
from consistentid_core.base_models import base_model_spec

from ..attention_patch import PatchPlan
from ..config import ModelConfig
from .base import Host, checkpoint_forward

logger = logging.getLogger("train.hosts.comfy")


def run_setup_hooks(hooks: list[str], model: ModelConfig) -> None:
    """Call ``module:function`` or ``path/to/file.py:function`` hooks with the model config."""
    for hook in hooks:
        target, _, name = hook.rpartition(":")
        if not target or not name:
            raise ValueError(f"setup hook {hook!r} must look like module:function or file.py:function")
        if target.endswith(".py"):
            spec = importlib.util.spec_from_file_location(Path(target).stem, target)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        getattr(module, name)(model)


def base_model_name(model_patcher: Any) -> str:
    import comfy.supported_models

    config = model_patcher.model.model_config
    if isinstance(config, comfy.supported_models.SDXL):
        return "sdxl"
    if isinstance(config, comfy.supported_models.SD15):
        return "sd15"
    raise ModelMismatch(f"ConsistentID trains on SD1.5 or SDXL checkpoints; this one is {type(config).__name__}")


def load_clip_vision(model: ModelConfig) -> Any:
    import comfy.clip_vision
    import comfy.utils

    if model.clip_vision_config:
        clip_vision = comfy.clip_vision.ClipVisionModel(model.clip_vision_config)
        missing, unexpected = clip_vision.load_sd(comfy.utils.load_torch_file(model.clip_vision, safe_load=True))
        if missing:
            raise ModelMismatch(f"{model.clip_vision} does not match {model.clip_vision_config}: missing {missing[:3]}")
        return clip_vision
    clip_vision = comfy.clip_vision.load(model.clip_vision)
    if clip_vision is None:
        raise ModelMismatch(f"ComfyUI does not recognise {model.clip_vision} as a CLIP vision model")
    return clip_vision


class ComfyHost(Host):
    def __init__(self, model: ModelConfig, root: Path, device: torch.device, dtype: torch.dtype, gradient_checkpointing: bool = False) -> None:
        booted = boot_comfyui(root, ["--cpu"] if device.type == "cpu" else [], extra_nodes=False, load_package=True)
        run_setup_hooks(model.setup_hooks, model)
        import comfy.model_management as mm
        import comfy.model_sampling
        import comfy.sd

        self.device = torch.device(mm.get_torch_device()) if device.type != "cpu" else device
        if self.device != device:
            raise RuntimeError(f"ComfyUI picked {self.device} but this process trains on {device}; set CUDA_VISIBLE_DEVICES per process")
        options = {"dtype": dtype} if device.type == "cuda" else {}
        text_options = {"dtype": dtype if device.type == "cuda" else torch.float32}
        self.patcher, self.clip, self.vae, _ = comfy.sd.load_checkpoint_guess_config(
            model.checkpoint, output_vae=True, output_clip=True, model_options=options, te_model_options=text_options
        )
        if self.clip is None or self.vae is None or self.vae.first_stage_model is None:
            raise ModelMismatch(f"{model.checkpoint} has no text encoder or no VAE; training needs a full checkpoint")
        self.base_model = base_model_name(self.patcher)
        self.spec = base_model_spec(self.base_model)
        # The nodes' one implementation of text (CLIP-G padding) and CLIP vision encoding.
        self._encode_token_ids = booted.our("conditioning").encode_token_ids
        sampling = self.patcher.model.model_sampling
        if not isinstance(sampling, comfy.model_sampling.EPS) or isinstance(sampling, comfy.model_sampling.V_PREDICTION):
            raise ModelMismatch("ConsistentID trains ε-prediction models (SD1.5, SDXL); this checkpoint predicts something else")
        self.clip_vision = load_clip_vision(model)
        self._clip_vision_states = booted.our("runtime").clip_vision_hidden_states(self.clip_vision)
        self.tokenizer = self.clip.tokenizer.clip_l.tokenizer
        self._alphas = (1.0 / (1.0 + sampling.sigmas.float() ** 2)).to(self.device)
        self.patcher.model.requires_grad_(False)
        unet_config = self.patcher.model.model_config.unet_config
        levels = len(self.spec.topology.levels)
        hidden = self.clip_vision.model.state_dict()["vision_model.embeddings.class_embedding"].shape[0]
        self.adapter_dims = {
            "channels": tuple(unet_config["model_channels"] * m for m in unet_config["channel_mult"][:levels]),
            "cross_attention_dim": unet_config["context_dim"],
            "clip_embedding_dim": int(hidden),
        }
        if gradient_checkpointing:
            self._checkpoint_blocks()
        logger.info("loaded %s (%s) and %s on %s", model.checkpoint, self.base_model, model.clip_vision, self.device)

    def _checkpoint_blocks(self) -> None:
        import comfy.ldm.modules.attention as attention
        import comfy.ldm.modules.diffusionmodules.openaimodel as openaimodel

        for module in self.patcher.model.diffusion_model.modules():
            if isinstance(module, (openaimodel.ResBlock, attention.SpatialTransformer)):
                checkpoint_forward(module)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        return self._alphas

    def install(self, plan: PatchPlan) -> None:
        for (attn, (block, number, index)), patch in plan.attention.items():
            self.patcher.set_model_patch_replace(patch, attn, block, number, index)
        for key, wrapper in plan.weight_wrappers.items():
            self.patcher.add_weight_wrapper(key, wrapper)
        shapes = {key: tuple(value.shape) for key, value in self.patcher.model.state_dict().items()}
        missing = [key for key in plan.weight_wrappers if key not in shapes]
        wrong = [
            f"{key} {shapes[key]} vs LoRA {(wrapper.pair.up.weight.shape[0], wrapper.pair.down.weight.shape[1])}"
            for key, wrapper in plan.weight_wrappers.items()
            if key in shapes and shapes[key] != (wrapper.pair.up.weight.shape[0], wrapper.pair.down.weight.shape[1])
        ]
        if missing or wrong:
            raise ModelMismatch(
                f"this adapter does not fit the {self.base_model} UNet of the checkpoint: "
                + (f"no weights for {len(missing)} LoRA targets, e.g. {missing[:2]}; " if missing else "")
                + (f"{len(wrong)} shapes differ, e.g. {wrong[:2]}" if wrong else "")
            )
        self._load_unet()

    def _load_unet(self) -> None:
        """(Re)load the UNet; ComfyUI attaches the weight wrappers on load and drops them on unload."""
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher], memory_required=0, force_full_load=True)

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        images = (pixels.float().clamp(-1, 1) * 0.5 + 0.5).permute(0, 2, 3, 1)
        latents = self.vae.encode(images)
        return self.patcher.model.process_latent_in(latents.to(self.device).float())

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(self.patcher.model.process_latent_out(latents.float()))
        return images.to(self.device).float().permute(0, 3, 1, 2)

    def encode_text(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        # The ids the original trained this base model on (BaseModelSpec.training_text_ids).
        contexts, pooled = [], []
        for ids in batch[self.spec.training_text_ids].tolist():
            context, pool = self._encode_token_ids(self.clip, self.spec, ids)
            contexts.append(context)
            pooled.append(pool)
        context = torch.cat(contexts).to(self.device).float()
        return context, (torch.cat(pooled).to(self.device).float() if self.spec.uses_pooled_text else None)

    def clip_hidden_states(self, pixels: torch.Tensor) -> torch.Tensor:
        return self._clip_vision_states(pixels).to(self.device).float()

    def _adm(self, conditioning: dict[str, Any], batch: int, target: int) -> torch.Tensor | None:
        if not self.spec.uses_pooled_text:
            return None
        rows = []
        for i in range(batch):
            height, width = (int(v) for v in conditioning["original_size"][i])
            top, left = (int(v) for v in conditioning["crop_top_left"][i])
            rows.append(
                self.patcher.model.encode_adm(
                    pooled_output=conditioning["pooled"][i : i + 1], width=width, height=height,
                    crop_w=left, crop_h=top, target_width=target, target_height=target,
                )
            )
        return torch.cat(rows).to(self.device)

    def predict_noise(self, noisy_latents, timesteps, context, conditioning):
        self._load_unet()
        model = self.patcher.model
        dtype = model.manual_cast_dtype or model.get_dtype()
        options = dict(self.patcher.model_options["transformer_options"])
        y = self._adm(conditioning, len(noisy_latents), noisy_latents.shape[-1] * 8)
        out = model.diffusion_model(
            noisy_latents.to(dtype), timesteps.float(), context=context.to(dtype),
            y=None if y is None else y.to(dtype), transformer_options=options,
        )
        return out.float()

    def base_weights(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in self.patcher.model.state_dict().items() if k.startswith("diffusion_model.")}
