"""Tiny random models in the real file formats, written into a ComfyUI models tree.

ComfyUI only recognises full-size architectures, so the session registers two model configs with
the real SD1.5 / SDXL block topology but small widths (``TinySD15``, ``TinySDXL``) and teaches the
CLIP vision loader the tiny tower's layout. Everything else runs ComfyUI's own code: checkpoints
are written by ``comfy.sd.save_checkpoint`` and read by ``CheckpointLoaderSimple``, the ControlNet
by ``ControlNetLoader``, and so on. Import only after ``cid_harness.import_comfyui``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import comfy.cldm.cldm
import comfy.clip_vision
import comfy.model_management as mm
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import comfy.utils

TINY_CLIP_L = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3}
TINY_CLIP_G = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_hidden_layers": 3}
TINY_CLIP_VISION = {
    "hidden_size": 32, "image_size": 224, "intermediate_size": 64, "num_attention_heads": 4, "num_channels": 3,
    "num_hidden_layers": 3, "patch_size": 14, "projection_dim": 16, "hidden_act": "gelu", "layer_norm_eps": 1e-5,
    "model_type": "clip_vision_model",
}
ADM_TIMESTEP_FEATURES = 6 * 256  # SDXL: size/crop/target embeddings (model_base.SDXL.encode_adm)

SD15_UNET = {
    "context_dim": 64, "model_channels": 32, "use_linear_in_transformer": False,
    "adm_in_channels": None, "use_temporal_attention": False,
}
SD15_FULL_UNET = {
    **SD15_UNET, "channel_mult": [1, 1, 1, 1], "num_res_blocks": [2, 2, 2, 2],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "transformer_depth_middle": 1, "in_channels": 4, "out_channels": 4, "image_size": 32,
    "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False, "use_temporal_resblock": False,
}
SDXL_UNET = {
    "model_channels": 64, "use_linear_in_transformer": True, "transformer_depth": [0, 0, 2, 2, 10, 10],
    "context_dim": 128, "adm_in_channels": TINY_CLIP_G["hidden_size"] + ADM_TIMESTEP_FEATURES,
    "use_temporal_attention": False,
}
SDXL_FULL_UNET = {
    **SDXL_UNET, "channel_mult": [1, 1, 1], "num_res_blocks": [2, 2, 2], "transformer_depth_middle": 10,
    "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10], "in_channels": 4, "out_channels": 4,
    "image_size": 32, "use_spatial_transformer": True, "legacy": False, "use_checkpoint": False,
    "use_temporal_resblock": False, "num_classes": "sequential",
}

FILES = {
    "sd15_checkpoint": ("checkpoints", "v1-5-pruned-emaonly.safetensors"),
    "sdxl_checkpoint": ("checkpoints", "sd_xl_base_1.0.safetensors"),
    "sd15_adapter": ("consistentid", "ConsistentID-v1.bin"),
    "sdxl_adapter": ("consistentid", "ConsistentID_SDXL-v1.bin"),
    "clip_vision": ("clip_vision", "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors"),
    "face_parser": ("face_parsing", "face_parsing.pth"),
    "controlnet": ("controlnet", "control_v11p_sd15_openpose.pth"),
}


class TinySD1Clip(comfy.sd1_clip.SD1ClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}, **kwargs):
        super().__init__(device=device, dtype=dtype, model_options={**model_options, "clip_l_model_config": TINY_CLIP_L}, **kwargs)


class TinySDXLClip(comfy.sdxl_clip.SDXLClipModel):
    def __init__(self, device="cpu", dtype=None, model_options={}):
        options = {**model_options, "clip_l_model_config": TINY_CLIP_L, "clip_g_model_config": TINY_CLIP_G}
        super().__init__(device=device, dtype=dtype, model_options=options)


class TinySD15(comfy.supported_models.SD15):
    unet_config = SD15_UNET

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, TinySD1Clip)


class TinySDXL(comfy.supported_models.SDXL):
    unet_config = SDXL_UNET

    def clip_target(self, state_dict={}):
        return comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, TinySDXLClip)


def register_tiny_architectures(clip_vision_json: Path) -> None:
    """Let ComfyUI's detection recognise the tiny models (test session only)."""
    for config in (TinySD15, TinySDXL):
        if config not in comfy.supported_models.models:
            comfy.supported_models.models.append(config)
    original = comfy.clip_vision.load_clipvision_from_sd
    if getattr(original, "tiny_aware", False):
        return

    def load_clipvision_from_sd(sd, prefix="", convert_keys=False):
        width = sd.get("vision_model.embeddings.class_embedding")
        if width is not None and width.shape[0] == TINY_CLIP_VISION["hidden_size"]:
            clip = comfy.clip_vision.ClipVisionModel(str(clip_vision_json))
            clip.load_sd(sd)
            return clip
        return original(sd, prefix, convert_keys)

    load_clipvision_from_sd.tiny_aware = True
    comfy.clip_vision.load_clipvision_from_sd = load_clipvision_from_sd


def init_weights(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights (ComfyUI's ops skip initialisation): 1/sqrt(fan_in) matrices, norms ≈ 1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.dim() <= 1:
                base = 1.0 if name.endswith("weight") or name.endswith("vae_scale") else 0.0
                value = base + 0.1 * torch.randn(param.shape, generator=generator)
            else:
                value = torch.randn(param.shape, generator=generator) / math.sqrt(param[0].numel())
            param.copy_(value.to(param.dtype))
    return module


def model_patcher(config_class, unet_config: dict, seed: int) -> comfy.model_patcher.ModelPatcher:
    """A randomly initialised tiny MODEL of one of the registered configs, fp32."""
    model_config = config_class(dict(unet_config))
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def _clip(config_class, seed: int) -> comfy.sd.CLIP:
    clip = comfy.sd.CLIP(target=config_class({}).clip_target(), model_options={"dtype": torch.float32})
    init_weights(clip.cond_stage_model, seed)
    return clip


def _vae(seed: int) -> comfy.sd.VAE:
    taesd = init_weights(comfy.taesd.taesd.TAESD(latent_channels=4), seed)
    return comfy.sd.VAE(sd={k: v.clone() for k, v in taesd.state_dict().items()})


def write_checkpoint(path: Path, config_class, unet_config: dict, seed: int) -> None:
    model = model_patcher(config_class, unet_config, seed)
    comfy.sd.save_checkpoint(str(path), model, _clip(config_class, seed + 1), _vae(seed + 2))


def write_clip_vision(path: Path, json_path: Path, seed: int) -> None:
    json_path.write_text(json.dumps(TINY_CLIP_VISION))
    clip_vision = comfy.clip_vision.ClipVisionModel(str(json_path))
    init_weights(clip_vision.model, seed)
    comfy.utils.save_torch_file({k: v.contiguous() for k, v in clip_vision.get_sd().items()}, str(path))


def write_controlnet(path: Path, seed: int) -> None:
    config = {**SD15_FULL_UNET, "num_heads": 8, "num_head_channels": -1}
    config.pop("out_channels")
    control = comfy.cldm.cldm.ControlNet(
        hint_channels=3, dtype=torch.float32, device="cpu", operations=comfy.ops.disable_weight_init, **config
    )
    init_weights(control, seed)
    torch.save({k: v.contiguous() for k, v in control.state_dict().items()}, str(path))


def write_face_parser(path: Path, seed: int) -> None:
    from facexlib.parsing.bisenet import BiSeNet

    torch.manual_seed(seed)
    net = BiSeNet(num_class=19)
    torch.save(net.state_dict(), str(path))


def write_images(input_dir: Path) -> dict[str, str]:
    """Reference photos and a pose image under ComfyUI's input directory."""
    from skimage import data

    portrait = data.astronaut()
    images = {
        "reference.png": portrait,
        "person_a.png": portrait,
        "person_b.png": np.ascontiguousarray(portrait[:, ::-1]),
        "gray.png": np.full((256, 256, 3), 128, np.uint8),
        "pose.png": _pose_image(),
    }
    input_dir.mkdir(parents=True, exist_ok=True)
    for name, array in images.items():
        Image.fromarray(array).save(input_dir / name)
    return {name: str(input_dir / name) for name in images}


def _pose_image() -> np.ndarray:
    image = np.zeros((512, 512, 3), np.uint8)
    image[96:416, 250:262] = (255, 0, 0)
    image[180:192, 140:372] = (0, 255, 0)
    return image


def build_models_tree(models_dir: Path, adapters: dict) -> dict[str, Path]:
    """Write every tiny model under ``models_dir`` with the names the example workflows use."""
    paths = {}
    for key, (folder, name) in FILES.items():
        (models_dir / folder).mkdir(parents=True, exist_ok=True)
        paths[key] = models_dir / folder / name
    clip_vision_json = models_dir / "clip_vision" / "tiny_clip_vision.json"
    register_tiny_architectures(clip_vision_json)
    write_checkpoint(paths["sd15_checkpoint"], TinySD15, SD15_FULL_UNET, seed=10)
    write_checkpoint(paths["sdxl_checkpoint"], TinySDXL, SDXL_FULL_UNET, seed=20)
    write_clip_vision(paths["clip_vision"], clip_vision_json, seed=30)
    write_controlnet(paths["controlnet"], seed=40)
    write_face_parser(paths["face_parser"], seed=50)
    adapters["sd15"].save(str(paths["sd15_adapter"]))
    adapters["sdxl"].save(str(paths["sdxl_adapter"]))
    return paths
