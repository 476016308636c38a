"""Facial prompts: mark a face caption, assemble it with the user prompt, find the facial tokens.

Pure Python (no torch, no ComfyUI); the tokenizer is any transformers CLIP tokenizer and is never
modified. Modules:

* ``parts``: the five facial parts, their BiSeNet labels, crop order vs marker order;
* ``markers``: the original's caption marking and clause alignment, quirks included;
* ``tokens``: ids, facial token mask and slots without adding ``<|facial|>`` to the tokenizer;
* ``assembly``: inference and training prompt layouts, :class:`FacialPrompt`.
"""

from consistentid_core.prompt.assembly import (
    DEFAULT_FACE_CAPTION,
    DETAIL_PREFIX,
    SDXL_DEFAULT_FACE_CAPTION,
    SDXL_DETAIL_PREFIX,
    FacialPrompt,
    PromptLayout,
    build_facial_prompt,
    build_training_prompt,
    strip_user_markers,
)
from consistentid_core.prompt.markers import FACIAL_MARKER, MarkedCaption, mark_caption
from consistentid_core.prompt.parts import FacialPart, select_part_labels
from consistentid_core.prompt.tokens import (
    CLIP_CONTEXT_LENGTH,
    MAX_FACIAL_SLOTS,
    encode_marked_text,
    encode_plain_text,
    facial_token_slots,
)

__all__ = [
    "CLIP_CONTEXT_LENGTH",
    "DEFAULT_FACE_CAPTION",
    "DETAIL_PREFIX",
    "FACIAL_MARKER",
    "MAX_FACIAL_SLOTS",
    "SDXL_DEFAULT_FACE_CAPTION",
    "SDXL_DETAIL_PREFIX",
    "FacialPart",
    "FacialPrompt",
    "MarkedCaption",
    "PromptLayout",
    "build_facial_prompt",
    "build_training_prompt",
    "encode_marked_text",
    "encode_plain_text",
    "facial_token_slots",
    "mark_caption",
    "select_part_labels",
    "strip_user_markers",
]
