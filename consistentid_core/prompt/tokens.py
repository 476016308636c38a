"""Token ids and the facial token mask of a marked prompt, without adding tokens to the tokenizer.

The original adds ``<|facial|>`` to its CLIP tokenizer as a special token, encodes the marked
prompt with ``tokenizer.encode`` and then removes the marker ids
(``functions.tokenize_and_mask_noun_phrases_ends``). A shared tokenizer must not grow (ComfyUI
shares one object between all CLIP clones and the text encoder has exactly 49408 rows), so we get
the same ids another way: a special token splits the text before BPE runs, so the pieces between
markers are tokenised on their own. Reproduced behaviour:

* ids = BOS, the pieces' tokens, EOS; each marker sets the mask at the position of the token just
  before it (``clean_index - 1``);
* ids longer than 77 are cut to 77 **without** keeping EOS, shorter ones are padded with
  ``pad_token_id``; mask positions beyond 76 are lost;
* the valid slots come from the text (``prepare_image_token_idx``): the first *k* of 5 slots are
  valid when *k* tokens are marked, and their indices are padded with 0;
* the text-only branch is the diffusers ``_encode_prompt`` call: pad to 77 with truncation (EOS kept);
* the length check that selects the prompt layout counts the markers as tokens
  (``padding="max_length", truncation=False`` and ``!= 77``).

Always 77 (:data:`CLIP_CONTEXT_LENGTH`), never ``tokenizer.model_max_length``: ComfyUI's
``sd1_tokenizer`` says 8192.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from consistentid_core.errors import PromptError
from consistentid_core.prompt.markers import FACIAL_MARKER

CLIP_CONTEXT_LENGTH = 77
"""Token positions of the CLIP text encoder (SD1.5 and SDXL)."""

MAX_FACIAL_SLOTS = 5
"""Facial tokens/crops per prompt: the original's ``max_num_facials``."""


def _piece_ids(tokenizer: Any, text: str) -> list[int]:
    # verbose=False: pieces longer than model_max_length are expected (the caller cuts at 77).
    return list(tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"])


def _special_ids(tokenizer: Any) -> tuple[int, int, int]:
    ids = (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id)
    if any(token_id is None for token_id in ids):
        raise PromptError(
            "The tokenizer has no BOS, EOS or pad token; a CLIP tokenizer (transformers "
            "CLIPTokenizer) is needed for the facial prompt."
        )
    return ids


def marked_token_count(marked_text: str, tokenizer: Any) -> int:
    """Tokens the original counts for ``marked_text``: BOS, EOS and one per marker included."""
    pieces = marked_text.split(FACIAL_MARKER)
    return 2 + len(pieces) - 1 + sum(len(_piece_ids(tokenizer, piece)) for piece in pieces)


def fits_context(marked_text: str, tokenizer: Any) -> bool:
    """The original's layout test: does the marked text fit 77 tokens, markers counted?"""
    return marked_token_count(marked_text, tokenizer) <= CLIP_CONTEXT_LENGTH


def encode_marked_text(marked_text: str, tokenizer: Any) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Return the 77 marker-free ids of ``marked_text`` and the 77-long facial token mask."""
    bos, eos, pad = _special_ids(tokenizer)
    ids = [bos]
    marked_positions = set()
    pieces = marked_text.split(FACIAL_MARKER)
    for index, piece in enumerate(pieces):
        ids.extend(_piece_ids(tokenizer, piece))
        if index < len(pieces) - 1:
            marked_positions.add(len(ids) - 1)
    ids.append(eos)
    ids = ids[:CLIP_CONTEXT_LENGTH] + [pad] * (CLIP_CONTEXT_LENGTH - len(ids))
    mask = tuple(position in marked_positions for position in range(CLIP_CONTEXT_LENGTH))
    return tuple(ids), mask


def encode_plain_text(text: str, tokenizer: Any) -> tuple[int, ...]:
    """77 ids as diffusers' ``_encode_prompt`` makes them: BOS, text, EOS, padded, EOS kept when cut."""
    encoded = tokenizer(
        text, max_length=CLIP_CONTEXT_LENGTH, padding="max_length", truncation=True
    )
    return tuple(encoded["input_ids"])


def facial_token_slots(
    facial_token_mask: Sequence[bool], max_slots: int = MAX_FACIAL_SLOTS
) -> tuple[tuple[int, ...], tuple[bool, ...]]:
    """Positions of the facial tokens padded with 0 to ``max_slots``, and which slots are valid.

    The original's ``prepare_image_token_idx`` returns the same pair (``facial_token_idx``,
    ``facial_token_idx_mask``) for the trainer's localization loss and the FacialEncoder. It does
    not truncate, so more than ``max_slots`` marked tokens break tensor shapes downstream; here that
    is an error instead.
    """
    positions = tuple(index for index, marked in enumerate(facial_token_mask) if marked)
    if len(positions) > max_slots:
        raise PromptError(
            f"{len(positions)} facial tokens are marked but only {max_slots} facial slots exist."
        )
    padding = max_slots - len(positions)
    return positions + (0,) * padding, (True,) * len(positions) + (False,) * padding
