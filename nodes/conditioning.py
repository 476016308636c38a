"""``encode_conditioning``: the facial prompt through the graph's CLIP, fused with the face regions.

Built as the original pipelines do (``pipline_StableDiffusion_ConsistentID.py`` /
``pipline_StableDiffusionXL_ConsistentID.py``; ``reference-semantics.md`` §4.15-25):

* the facial prompt (user prompt + ``Detail:`` + the marked face caption, 77 CLIP BPE ids with the
  markers removed, the facial token mask) comes from ``consistentid_core.prompt``; we encode those
  ids with ``clip.encode_from_tokens`` and a token list we build (ComfyUI's own tokenizer would
  re-chunk and re-weight the text, and its word ids cannot locate words);
* text features: SD1.5 the CLIP-L last layer (diffusers ``prompt_embeds``); SDXL CLIP-L and CLIP-G
  penultimate layers concatenated to 2048, pooled output from CLIP-G (ComfyUI's SDXL CLIP does
  exactly this); a ``CLIPSetLastLayer`` upstream is honoured;
* the marked tokens are fused with their regions' features by the adapter's FacialEncoder;
* delayed subject conditioning (``start_merge_step``) becomes two conditioning entries: text only on
  ``[0, merge_at)``, fused on ``[merge_at, 1]``;
* every entry is tagged with its role (``id_attention.ROLE_KEY``: positive / negative), so the ID
  branch gives the identity to the positive whatever position a guider puts it in;
* the negative is the negative text fused with the **unconditional** region features at the
  positive prompt's facial positions. SD1.5: that fused negative for the whole range (the original's
  uncond never switches). SDXL: the plain negative before ``merge_at`` and the fused one after.
  SDXL's text-only positive is the user prompt alone (no face caption), SD1.5's the full facial
  prompt without markers, as in the originals.

One fix: the original SDXL pipeline tokenised the marked prompt for CLIP-G with a tokenizer that
lacked the ``<|facial|>`` token, so CLIP-G saw the marker's BPE pieces and shifted positions;
training fed CLIP-G the marker-free text. We give CLIP-G the marker-free ids (CLIP-G padding).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch

from consistentid_core import ConsistentIDAdapter, ModelMismatch
from consistentid_core.attention import NEGATIVE, POSITIVE
from consistentid_core.base_models import BASE_MODELS, BaseModelSpec, base_model_spec, spec_for_text_encoders
from consistentid_core.face.labels import FACIAL_PART_LABELS
from consistentid_core.face_features import FaceFeatures
from consistentid_core.prompt import MAX_FACIAL_SLOTS, build_facial_prompt, encode_plain_text, strip_user_markers

from .id_attention import ROLE_KEY

CLIP_G_PAD = 0  # SDXL's second tokenizer pads with "!" (id 0); ComfyUI's CLIP-G tokenizer does too
FACIAL_PARTS = tuple(FACIAL_PART_LABELS)  # face, eyes, ears, nose, mouth


def default_face_caption(base_model: str | None) -> str:
    """The built-in caption of the original pipeline for this base model (None: the first release's, SD1.5)."""
    return base_model_spec(base_model or "sd15").face_caption


def _check_clip(clip: Any, adapter: ConsistentIDAdapter) -> None:
    found = spec_for_text_encoders(clip.tokenize("").keys())
    wanted = adapter.base_model_spec
    if found != wanted:
        described = found.display_name if found else "neither " + " nor ".join(s.display_name for s in BASE_MODELS.values())
        raise ModelMismatch(
            f"This ConsistentID model is for {wanted.display_name}, but the CLIP is "
            f"{described} (text encoders: {', '.join(sorted(clip.tokenize('').keys()))}). Connect the "
            f"CLIP of a {wanted.display_name} checkpoint."
        )


def _check_face(face: FaceFeatures, adapter: ConsistentIDAdapter) -> None:
    wanted = adapter.facial.visual_projection.proj_in.in_features
    if face.clip_embedding_dim != wanted:
        raise ModelMismatch(
            f"The face was encoded with a {face.clip_embedding_dim}-wide CLIP vision model, but this "
            f"ConsistentID model needs {wanted}-wide features (CLIP-ViT-H-14, laion2B-s32B-b79K)."
        )


def encode_token_ids(clip: Any, spec: BaseModelSpec, ids: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(1, 77, D)`` text features and the pooled output for 77 CLIP-L token ids, no prompt weighting.

    The same ids go to every text encoder of the base model; CLIP-G gets them padded with
    :data:`CLIP_G_PAD` after the end token, as SDXL's second tokenizer pads. The nodes and the
    trainer's ComfyUI host both encode text through this function.
    """
    ids = [int(i) for i in ids]
    eos = clip.tokenizer.clip_l.tokenizer.eos_token_id
    tokens = {"l": [[(i, 1.0) for i in ids]]}
    if "g" in spec.text_encoders:
        end = ids.index(eos) + 1 if eos in ids else len(ids)
        tokens["g"] = [[(i, 1.0) for i in ids[:end]] + [(CLIP_G_PAD, 1.0)] * (len(ids) - end)]
    cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    return cond, pooled


def _entry(cond: torch.Tensor, pooled: torch.Tensor | None, role: str, span: tuple[float, float] | None = None) -> list | None:
    """One conditioning entry (on ``span`` of the denoising, or all of it), tagged with its role."""
    options = {"pooled_output": pooled, ROLE_KEY: role}
    if span is not None:
        start, end = span
        if end <= start:
            return None
        options.update(start_percent=start, end_percent=end)
    return [cond, options]


def _conditioning(*entries: list | None) -> list:
    return [entry for entry in entries if entry is not None]


def encode_conditioning(
    clip: Any,
    adapter: ConsistentIDAdapter,
    face: FaceFeatures,
    text: str,
    negative_text: str,
    facial_weight: float = 1.0,
    merge_at: float = 0.6,
    *,
    face_caption: str | None = None,
    parts: Iterable[str] | None = None,
    prepare_adapter: Callable[[], object] | None = None,
) -> tuple[list, list]:
    """Return ComfyUI ``(positive, negative)`` conditioning for one face (module docstring).

    ``facial_weight`` blends the fused facial tokens with the plain text tokens (1 = the original,
    0 = plain text). ``face_caption`` None = the original's template for this base model.
    ``parts`` limits the facial parts used (default all of face, eyes, ears, nose, mouth); a part
    left out behaves as if the parser had not found it. Raises ModelMismatch for a CLIP or face of
    another base model. ``prepare_adapter`` runs after the text encoders and before the adapter
    computes (the nodes load the adapter there, so loading CLIP cannot evict it first).
    """
    _check_clip(clip, adapter)
    _check_face(face, adapter)
    if not 0.0 <= merge_at <= 1.0:
        raise ValueError(f"merge_at must be within [0, 1], got {merge_at}")
    spec = adapter.base_model_spec
    tokenizer = clip.tokenizer.clip_l.tokenizer

    negative_cond, negative_pooled = encode_token_ids(clip, spec, encode_plain_text(negative_text, tokenizer))
    if face.is_empty:  # skip policy and no face anywhere: plain text, no facial fusion
        plain_ids = encode_plain_text(strip_user_markers(text), tokenizer)
        text_cond, text_pooled = encode_token_ids(clip, spec, plain_ids)
        return [_entry(text_cond, text_pooled, POSITIVE)], [_entry(negative_cond, negative_pooled, NEGATIVE)]

    allowed = set(FACIAL_PARTS if parts is None else parts)
    unknown = allowed - set(FACIAL_PARTS)
    if unknown:
        raise ValueError(f"unknown facial parts {sorted(unknown)}; choose from {FACIAL_PARTS}")
    labels = [label for label in face.present_labels if any(label in FACIAL_PART_LABELS[p] for p in allowed)]
    prompt = build_facial_prompt(
        text,
        spec.face_caption if face_caption is None else face_caption,
        labels,
        tokenizer,
        detail_prefix=spec.detail_prefix,
        pairing=adapter.pairing,  # the file's metadata; the released weights: original
    )
    facial_cond, facial_pooled = encode_token_ids(clip, spec, prompt.input_ids)
    text_cond, text_pooled = encode_token_ids(clip, spec, spec.text_only_ids(prompt, text, tokenizer))

    if prepare_adapter is not None:
        prepare_adapter()
    token_mask = torch.tensor(prompt.facial_token_mask, dtype=torch.bool)[None]
    valid = torch.tensor(prompt.valid_region_mask, dtype=torch.bool)[None]
    with torch.no_grad():
        regions = face.region_stack(prompt.region_labels, MAX_FACIAL_SLOTS, adapter.pairing)[None]
        fused = adapter.facial_encoder(facial_cond, regions, token_mask, valid, weight=facial_weight)
        uncond_regions = face.uncond_region_stack(MAX_FACIAL_SLOTS)[None]
        fused_negative = adapter.facial_encoder(negative_cond, uncond_regions, token_mask, valid, weight=facial_weight)
    fused = fused.to(facial_cond.device)
    fused_negative = fused_negative.to(negative_cond.device)

    positive = _conditioning(
        _entry(text_cond, text_pooled, POSITIVE, (0.0, merge_at)),
        _entry(fused, facial_pooled, POSITIVE, (merge_at, 1.0)),
    )
    if spec.negative_switches_at_merge:
        negative = _conditioning(
            _entry(negative_cond, negative_pooled, NEGATIVE, (0.0, merge_at)),
            _entry(fused_negative, negative_pooled, NEGATIVE, (merge_at, 1.0)),
        )
    else:
        negative = [_entry(fused_negative, negative_pooled, NEGATIVE)]
    return positive, negative
