"""What differs between the SD1.5 and the SDXL release, in one table: code asks it, never ``== "sdxl"``.

Every entry follows the original pipeline and training code of that base model
(``pipline_StableDiffusion_ConsistentID.py`` / ``pipline_StableDiffusionXL_ConsistentID.py``,
``train.py`` / ``train_SDXL.py``; ``reference-semantics.md``), because the released weights were
trained that way. The attention layout (which processor index patches which UNet layer) is the
``topology`` from :mod:`consistentid_core.checkpoint.layout`.

To support another base model, add its :class:`UNetTopology` to ``checkpoint/layout.py`` and a
:class:`BaseModelSpec` here; nothing else branches on the base model's name.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from consistentid_core.checkpoint.layout import SD15, SDXL, UNetTopology
from consistentid_core.prompt.assembly import (
    DEFAULT_FACE_CAPTION,
    DETAIL_PREFIX,
    SDXL_DEFAULT_FACE_CAPTION,
    SDXL_DETAIL_PREFIX,
    FacialPrompt,
    strip_user_markers,
)
from consistentid_core.prompt.tokens import encode_plain_text

__all__ = [
    "BASE_MODELS", "BaseModelSpec", "base_model_spec", "display_name", "release_files_hint", "spec_for_text_encoders",
]


@dataclass(frozen=True)
class BaseModelSpec:
    """One base model as the original ConsistentID release treats it."""

    display_name: str
    """For messages: ``"SD1.5"``, ``"SDXL"``."""
    topology: UNetTopology
    release_file: str
    """The released adapter's file name (Hugging Face JackAILab/ConsistentID)."""
    image_proj_key: str
    """Key of the ID projection in the release ``.bin`` that the original loader of this base model
    reads (reading accepts both variants; writing uses this one so the original can load our files)."""
    text_encoders: frozenset[str]
    """ComfyUI's tokenizer keys of the base model's CLIP: CLIP-L alone, or CLIP-G and CLIP-L."""
    face_caption: str
    """The built-in face caption of the original pipeline."""
    detail_prefix: str
    """What joins the user prompt and the marked face caption."""
    text_only_is_user_prompt: bool
    """Positive before ``merge_at``: the user prompt alone (SDXL) or the facial prompt without its
    markers (SD1.5)."""
    negative_switches_at_merge: bool
    """Negative: plain text before ``merge_at`` and fused after (SDXL), or fused throughout (SD1.5)."""
    id_shortcut: bool
    """Whether the release pipeline runs the ID projection with its shortcut."""
    training_text_ids: str
    """Which ids of a training sample the original trained the text encoder input on: the
    marker-free facial prompt (``input_ids``, SD1.5) or its plain tokenisation
    (``text_only_input_ids``, SDXL)."""

    @property
    def name(self) -> str:
        """``ConsistentIDAdapter.base_model`` and the ``base_model`` metadata of saved files."""
        return self.topology.name

    @property
    def uses_pooled_text(self) -> bool:
        """SDXL's UNet also takes CLIP-G's pooled output (through its ADM embedding)."""
        return "g" in self.text_encoders

    def text_only_ids(self, prompt: FacialPrompt, user_text: str, tokenizer: Any) -> tuple[int, ...]:
        """The 77 ids of the text-only positive (before ``merge_at``) for ``prompt``."""
        if self.text_only_is_user_prompt:
            return encode_plain_text(strip_user_markers(user_text), tokenizer)
        return prompt.text_only_input_ids


SD15_SPEC = BaseModelSpec(
    display_name="SD1.5",
    topology=SD15,
    release_file="ConsistentID-v1.bin",
    image_proj_key="image_proj",
    text_encoders=frozenset({"l"}),
    face_caption=DEFAULT_FACE_CAPTION,
    detail_prefix=DETAIL_PREFIX,
    text_only_is_user_prompt=False,
    negative_switches_at_merge=False,
    id_shortcut=False,
    training_text_ids="input_ids",
)
SDXL_SPEC = BaseModelSpec(
    display_name="SDXL",
    topology=SDXL,
    release_file="ConsistentID_SDXL-v1.bin",
    image_proj_key="image_proj_model",
    text_encoders=frozenset({"g", "l"}),
    face_caption=SDXL_DEFAULT_FACE_CAPTION,
    detail_prefix=SDXL_DETAIL_PREFIX,
    text_only_is_user_prompt=True,
    negative_switches_at_merge=True,
    id_shortcut=True,
    training_text_ids="text_only_input_ids",
)
BASE_MODELS: dict[str, BaseModelSpec] = {spec.name: spec for spec in (SD15_SPEC, SDXL_SPEC)}


def base_model_spec(name: str) -> BaseModelSpec:
    """The description of base model ``name`` (``"sd15"``, ``"sdxl"``); ValueError for others."""
    try:
        return BASE_MODELS[name]
    except KeyError:
        raise ValueError(f"unknown base model {name!r}; ConsistentID knows {', '.join(BASE_MODELS)}") from None


def display_name(name: str | None, unknown: str | None = None) -> str:
    """``"SD1.5"`` for ``"sd15"``; other names as given (or ``unknown`` when that is set)."""
    spec = BASE_MODELS.get(name) if name is not None else None
    if spec is not None:
        return spec.display_name
    return unknown if unknown is not None else str(name)


def spec_for_text_encoders(keys: Iterable[str]) -> BaseModelSpec | None:
    """The base model whose CLIP has exactly these ComfyUI tokenizer keys, None for other families."""
    keys = frozenset(keys)
    return next((spec for spec in BASE_MODELS.values() if spec.text_encoders == keys), None)


def release_files_hint() -> str:
    """``"ConsistentID-v1.bin for SD1.5, ConsistentID_SDXL-v1.bin for SDXL"`` for messages."""
    return ", ".join(f"{spec.release_file} for {spec.display_name}" for spec in BASE_MODELS.values())
