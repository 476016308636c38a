"""Assemble the user prompt and the marked face caption into the facial prompt, as the original does.

Inference (``pipline_StableDiffusion_ConsistentID.encode_prompt_with_trigger_word``), reproduced:

* ``prompt + "Detail:" + marked caption``, with no space before ``"Detail:"`` and no ``"Caption:"``;
* if that exceeds 77 tokens **counting the markers**, ``"Detail:" + marked caption + " Caption:" +
  prompt`` (the caption's facial tokens then come first and survive the cut to 77);
* if the *raw* face caption is longer than 330 characters, the prompt alone: no facial tokens, no
  valid slots (the original still computes the crops, which then go unused);
* the text-only prompt (used before ``start_merge_step``) is the chosen text with markers removed.

The SDXL pipeline uses ``"; Detail:"`` instead of ``"Detail:"``: pass :data:`SDXL_DETAIL_PREFIX`.

Training (``utils.MyDataset.__getitem__``, the same in ``utils_SDXL.py``), reproduced:

* ``"Caption:" + first sentence + " Detail:" + marked caption + rest``, where *first sentence* is
  ``extract_first_sentence`` (up to and including the first ``"."``, stripped) and *rest* is the
  caption from ``len(first sentence)`` to its last character **excluded** (``[len(first):-1]``: the
  final period, or whatever the last character is, is dropped, and leading whitespace shifts the cut);
* if that exceeds 77 tokens counting markers, ``"Detail:" + marked caption + " Caption:" + caption``;
* if the **marked** caption (not the raw one, unlike inference) is longer than 340 characters, the
  general caption alone;
* with text dropout (the dataset's 10 % branch) the text is ``""``, decided after all of the above.

Defect fixed: markers in user text. ``<|facial|>`` typed into the prompt (or the training caption)
would be read by the original as a marker: it marks a token, is counted by the length check, and
with more than five markers ``prepare_image_token_idx`` returns more than five slots and the
FacialEncoder's shapes break. ``<|image|>`` would stay in the ids as 49408, one past the text
encoder's vocabulary. We remove both strings from user text before assembly (repeatedly, so removal
cannot form a new marker); the face caption needs nothing, since its normalisation already drops
``<``, ``|`` and ``>``. Everything else equals the original's output whenever user text has no markers.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import Enum
from typing import Any

from consistentid_core.errors import PromptError
from consistentid_core.prompt.markers import FACIAL_MARKER, MarkedCaption, mark_caption
from consistentid_core.prompt.parts import select_part_labels
from consistentid_core.prompt.tokens import encode_marked_text, encode_plain_text, facial_token_slots, fits_context

DEFAULT_FACE_CAPTION = "The person has one face, one nose, two eyes, two ears, and one mouth."
"""The SD1.5 pipeline's built-in caption (``get_prepare_llva_caption``; LLaVA is disabled there)."""

SDXL_DEFAULT_FACE_CAPTION = "The person has one face, one nose, two eyes, two ears, and a mouth."
"""The SDXL pipeline's built-in caption."""

DETAIL_PREFIX = "Detail:"
SDXL_DETAIL_PREFIX = "; Detail:"
CAPTION_PREFIX = " Caption:"

MAX_FACE_CAPTION_CHARS = 330
"""Inference: a longer raw face caption disables the facial tokens (``max_text_length``)."""

MAX_TRAINING_MARKED_CAPTION_CHARS = 340
"""Training: a longer marked caption disables the facial tokens (``utils.py``)."""

IMAGE_MARKER = "<|image|>"
"""The original's second added token; never used for ConsistentID, only removed from user text."""


class PromptLayout(Enum):
    """Which of the original's text layouts was chosen."""

    PROMPT_THEN_DETAIL = "prompt + Detail: caption"
    CAPTION_THEN_DETAIL = "Caption: first sentence + Detail: caption + rest"
    DETAIL_THEN_CAPTION = "Detail: caption + Caption: prompt"
    WITHOUT_DETAIL = "prompt or caption alone (face caption too long)"
    TEXT_DROPPED = "empty text (training text dropout)"


@dataclass(frozen=True)
class FacialPrompt:
    """Everything the text encoder and the FacialEncoder need from one prompt.

    All sequences are tuples (hashable, torch-free); slot order is crop order (see ``parts``).
    """

    input_ids: tuple[int, ...]
    """77 ids of ``text`` for the facial branch (hard-cut at 77, EOS not kept when cut)."""
    facial_token_mask: tuple[bool, ...]
    """77 flags: the token just before each marker."""
    facial_token_indices: tuple[int, ...]
    """Positions of the facial tokens, padded with 0 to 5 slots."""
    valid_region_mask: tuple[bool, ...]
    """5 flags: which slots hold a facial token (and take a crop); derived from the text."""
    region_labels: tuple[int, ...]
    """BiSeNet label of the crop for each valid slot, in slot order."""
    text_only_input_ids: tuple[int, ...]
    """77 ids of ``text`` as diffusers' ``_encode_prompt`` makes them (EOS kept when cut)."""
    marked_text: str
    """The assembled text with ``<|facial|>`` markers."""
    text: str
    """``marked_text`` without markers."""
    aligned_caption: str
    """The marked face caption as it appears in the text; empty when the facial path is dropped."""
    layout: PromptLayout

    @property
    def num_valid_slots(self) -> int:
        return sum(self.valid_region_mask)


def strip_user_markers(text: str) -> str:
    """Remove ``<|facial|>`` and ``<|image|>`` from user text until none is left (module docstring)."""
    while FACIAL_MARKER in text or IMAGE_MARKER in text:
        text = text.replace(FACIAL_MARKER, "").replace(IMAGE_MARKER, "")
    return text


def _check_text(name: str, value: Any) -> str:
    if not isinstance(value, str):
        raise PromptError(f"{name} must be a string, got {type(value).__name__}.")
    return value


def _mark(face_caption: str, present_labels: Iterable[int], pairing: str = "original") -> MarkedCaption:
    try:
        part_labels = select_part_labels(present_labels)
    except (TypeError, ValueError) as error:
        raise PromptError(f"present_labels must be BiSeNet label ids (integers): {error}") from error
    return mark_caption(face_caption, part_labels, pairing)


def _finish(marked_text: str, caption: MarkedCaption | None, layout: PromptLayout, tokenizer: Any) -> FacialPrompt:
    input_ids, facial_token_mask = encode_marked_text(marked_text, tokenizer)
    indices, valid = facial_token_slots(facial_token_mask)
    available = caption.region_labels if caption is not None else ()
    if sum(valid) > len(available):
        raise PromptError(
            f"{sum(valid)} facial tokens but only {len(available)} facial regions; "
            "the prompt contains markers that do not come from the face caption."
        )
    text = marked_text.replace(FACIAL_MARKER, "")
    return FacialPrompt(
        input_ids=input_ids,
        facial_token_mask=facial_token_mask,
        facial_token_indices=indices,
        valid_region_mask=valid,
        region_labels=available[: sum(valid)],
        text_only_input_ids=encode_plain_text(text, tokenizer),
        marked_text=marked_text,
        text=text,
        aligned_caption=caption.text if caption is not None else "",
        layout=layout,
    )


def build_facial_prompt(
    prompt: str,
    face_caption: str | None,
    present_labels: Iterable[int],
    tokenizer: Any,
    *,
    detail_prefix: str = DETAIL_PREFIX,
    pairing: str = "original",
) -> FacialPrompt:
    """Build the inference facial prompt exactly as the original pipeline does.

    ``face_caption`` None means :data:`DEFAULT_FACE_CAPTION`. ``present_labels`` are the BiSeNet
    label ids found in the reference face's parsing. ``tokenizer`` is a transformers CLIP tokenizer;
    it is only called, never modified, and its ``model_max_length`` is ignored (77 is used).
    """
    prompt = strip_user_markers(_check_text("prompt", prompt))
    face_caption = DEFAULT_FACE_CAPTION if face_caption is None else _check_text("face_caption", face_caption)
    caption = _mark(face_caption, present_labels, pairing)
    if len(face_caption) > MAX_FACE_CAPTION_CHARS:
        return _finish(prompt, None, PromptLayout.WITHOUT_DETAIL, tokenizer)
    marked_text = prompt + detail_prefix + caption.text
    layout = PromptLayout.PROMPT_THEN_DETAIL
    if not fits_context(marked_text, tokenizer):
        marked_text = detail_prefix + caption.text + CAPTION_PREFIX + prompt
        layout = PromptLayout.DETAIL_THEN_CAPTION
    return _finish(marked_text, caption, layout, tokenizer)


def extract_first_sentence(text: str) -> str:
    """Text up to and including the first ``"."``, stripped; all of it stripped if there is none."""
    end = text.find(".")
    return (text[: end + 1] if end != -1 else text).strip()


def build_training_prompt(
    detail_caption: str,
    caption: str,
    present_labels: Iterable[int],
    tokenizer: Any,
    *,
    drop_text: bool = False,
    pairing: str = "original",
) -> FacialPrompt:
    """Build the training facial prompt exactly as the original dataset does.

    ``detail_caption`` is the facial description that gets marked (the dataset's
    ``vqa_llva_more_face_detail``), ``caption`` the general image caption (``vqa_llva``).
    ``drop_text`` is the dataset's text dropout; the caller draws it. Layouts: module docstring.
    """
    detail_caption = _check_text("detail_caption", detail_caption)
    caption = strip_user_markers(_check_text("caption", caption))
    marked = _mark(detail_caption, present_labels, pairing)
    if drop_text:
        return _finish("", None, PromptLayout.TEXT_DROPPED, tokenizer)
    if len(marked.text) > MAX_TRAINING_MARKED_CAPTION_CHARS:
        return _finish(caption, None, PromptLayout.WITHOUT_DETAIL, tokenizer)
    first_sentence = extract_first_sentence(caption)
    marked_text = "Caption:" + first_sentence + " Detail:" + marked.text + caption[len(first_sentence) : -1]
    if fits_context(marked_text, tokenizer):
        return _finish(marked_text, marked, PromptLayout.CAPTION_THEN_DETAIL, tokenizer)
    marked_text = DETAIL_PREFIX + marked.text + CAPTION_PREFIX + caption
    return _finish(marked_text, marked, PromptLayout.DETAIL_THEN_CAPTION, tokenizer)
