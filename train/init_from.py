"""Initialising a new adapter from IP-Adapter-FaceID(-Plus) weights, as the paper did.

ConsistentID's ID projection is IP-Adapter-FaceID-Plus's ``ProjPlusModel`` and its ID key/value
are FaceID's ``to_k_ip``/``to_v_ip``, so the paper initialised them from
``ip-adapter-faceid-plus_sd15.bin``. That file holds two state dicts (tencent-ailab/IP-Adapter,
``ip_adapter/ip_adapter_faceid.py``):

* ``image_proj``: ``proj.0``/``proj.2`` (ArcFace MLP), ``norm``, ``perceiver_resampler.proj_in``/
  ``proj_out``/``norm_out`` and ``perceiver_resampler.layers.N.{0,1}.…`` — the same names as our
  :class:`~consistentid_core.models.IDProjection`;
* ``ip_adapter``: the diffusers attention processors in UNet order, ``N.to_{q,k,v,out}_lora.{down,up}``
  and, for cross-attention processors (odd ``N``), ``N.to_k_ip.weight``/``N.to_v_ip.weight`` — the
  same processor order as ConsistentID's ``adapter_modules``.

A ``.safetensors`` conversion uses the prefixes ``image_proj.`` and ``ip_adapter.``. Every ID
projection tensor and every ID key/value whose name and shape match is copied; the rest keeps its
fresh initialisation (ID k/v from the UNet's k/v, FacialEncoder random, LoRA ``up`` at zero: FaceID's
LoRA was trained for another conditioning and is not taken).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from consistentid_core import CheckpointFormatError, ConsistentIDAdapter

logger = logging.getLogger("train.fit")

IMAGE_PROJ, IP_ADAPTER = "image_proj", "ip_adapter"
ID_KEY_VALUE = ("to_k_ip.weight", "to_v_ip.weight")


@dataclass
class InitReport:
    copied: list[str] = field(default_factory=list)
    shape_mismatch: list[str] = field(default_factory=list)

    def summary(self) -> str:
        projection = sum(k.startswith("id_projection.") for k in self.copied)
        key_value = len(self.copied) - projection
        text = f"{projection} ID-projection and {key_value} ID key/value tensors copied"
        if self.shape_mismatch:
            text += f"; {len(self.shape_mismatch)} kept fresh (other shape), e.g. {self.shape_mismatch[:2]}"
        return text


def _read(path: Path) -> dict:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        data = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointFormatError(f"{path.name} could not be read as a PyTorch weights file ({type(error).__name__})") from error
    return data if isinstance(data, dict) else {}


def read_ipadapter_faceid(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]] | None:
    """``(image_proj, ip_adapter)`` of an IP-Adapter-FaceID file, or ``None`` if it is not one."""
    path = Path(path)
    raw = _read(path)
    if isinstance(raw.get(IMAGE_PROJ), dict) and isinstance(raw.get(IP_ADAPTER), dict):
        return dict(raw[IMAGE_PROJ]), dict(raw[IP_ADAPTER])
    flat_proj = {k[len(IMAGE_PROJ) + 1:]: v for k, v in raw.items() if isinstance(k, str) and k.startswith(IMAGE_PROJ + ".")}
    flat_ip = {k[len(IP_ADAPTER) + 1:]: v for k, v in raw.items() if isinstance(k, str) and k.startswith(IP_ADAPTER + ".")}
    if flat_proj and flat_ip:
        return flat_proj, flat_ip
    return None


def is_ipadapter_faceid(path: str | Path) -> bool:
    return read_ipadapter_faceid(path) is not None


@torch.no_grad()
def init_from_ipadapter_faceid(adapter: ConsistentIDAdapter, path: str | Path) -> InitReport:
    """Copy the matching ID projection and ID key/value tensors of ``path`` into ``adapter``."""
    found = read_ipadapter_faceid(path)
    if found is None:
        raise CheckpointFormatError(f"{Path(path).name} is not an IP-Adapter-FaceID file (no image_proj and ip_adapter state dicts)")
    image_proj, ip_adapter = found
    report = InitReport()
    targets = {f"id_projection.{k}": (v, image_proj.get(k)) for k, v in adapter.id_projection.state_dict().items()}
    for index, (slot, layer) in enumerate(zip(adapter.slots, adapter.layers)):
        if slot.is_cross_attention:
            for name in ID_KEY_VALUE:
                targets[f"layers.{index}.{name}"] = (layer.state_dict()[name], ip_adapter.get(f"{index}.{name}"))
    for name, (target, source) in targets.items():
        if source is None:
            continue
        if tuple(source.shape) != tuple(target.shape):
            report.shape_mismatch.append(f"{name} {tuple(source.shape)} vs {tuple(target.shape)}")
            continue
        target.copy_(source.to(target.dtype))
        report.copied.append(name)
    if not report.copied:
        raise CheckpointFormatError(
            f"{Path(path).name}: no ID-projection or ID key/value tensor fits this adapter "
            f"({report.summary()}); is it for another base model?"
        )
    logger.info("initialised from %s: %s", path, report.summary())
    return report
