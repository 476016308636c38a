"""build_facial_prompt: the inference prompt, facial token mask and slots, as the original makes them."""

import dataclasses

import pytest

from consistentid_core.errors import PromptError
from consistentid_core.prompt import (
    CLIP_CONTEXT_LENGTH,
    DEFAULT_FACE_CAPTION,
    SDXL_DETAIL_PREFIX,
    PromptLayout,
    build_facial_prompt,
    encode_marked_text,
    facial_token_slots,
)
from tests.fixtures.clip_tokenizer import clip_tokenizer

EOS = 49407
ALL_PARTS = {0, 1, 2, 3, 4, 5, 7, 8, 10, 12, 13, 17}
TEMPLATE_MARKED = (
    "The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, "
    "one nose <|facial|>, and one mouth <|facial|>,"
)


def _facial_words(result):
    tokenizer = clip_tokenizer()
    ids = [token for token, marked in zip(result.input_ids, result.facial_token_mask) if marked]
    return [tokenizer.decode([token]).strip() for token in ids]


def test_template_with_all_parts_marks_each_part_and_pairs_ears_with_the_eye_crop():
    """Tokens come face, ears, eyes, nose, mouth; crops come face, eye, ear, nose, lip."""
    result = build_facial_prompt("a photo of a woman", DEFAULT_FACE_CAPTION, ALL_PARTS, clip_tokenizer())
    assert result.marked_text == "a photo of a womanDetail:" + TEMPLATE_MARKED
    assert result.text == result.marked_text.replace("<|facial|>", "")
    assert result.aligned_caption == TEMPLATE_MARKED
    assert result.layout is PromptLayout.PROMPT_THEN_DETAIL
    assert _facial_words(result) == ["face", "ears", "eyes", "nose", "mouth"]
    assert result.region_labels == (1, 4, 7, 10, 12)
    assert result.facial_token_indices == (12, 15, 18, 21, 25)
    assert result.valid_region_mask == (True,) * 5
    assert len(result.input_ids) == len(result.facial_token_mask) == CLIP_CONTEXT_LENGTH
    assert result.text_only_input_ids == result.input_ids


def test_subset_of_parts_fills_the_first_slots_only():
    result = build_facial_prompt("portrait", DEFAULT_FACE_CAPTION, {5, 8, 13}, clip_tokenizer())
    assert _facial_words(result) == ["ears", "eyes", "mouth"]
    assert result.region_labels == (5, 8, 13)
    assert result.valid_region_mask == (True, True, True, False, False)
    assert result.facial_token_indices[3:] == (0, 0)


def test_caption_without_part_words_leaves_detail_empty_and_no_valid_slot():
    result = build_facial_prompt("portrait", "A smiling man with short hair.", ALL_PARTS, clip_tokenizer())
    assert result.marked_text == "portraitDetail:"
    assert result.num_valid_slots == 0
    assert result.region_labels == ()
    assert result.facial_token_indices == (0,) * 5


def test_repeated_and_capitalised_words_follow_the_original():
    """Repeats are removed case-insensitively, matching is case-sensitive: 'Eyes', 'Nose' get no slot."""
    caption = "Her Eyes are blue, her eyes are big, her Nose is small and her mouth is wide."
    result = build_facial_prompt("portrait", caption, {1, 4, 10, 12}, clip_tokenizer())
    assert result.marked_text == "portraitDetail:her Nose is small and her mouth <|facial|> is wide,"
    assert _facial_words(result) == ["mouth"]
    assert result.region_labels == (12,)


def _padding_words_to_reach(total_with_markers: int) -> str:
    """A prompt of 'a' words that makes the marked template exactly this many tokens, markers counted."""
    base = build_facial_prompt("", DEFAULT_FACE_CAPTION, ALL_PARTS, clip_tokenizer())
    tokens_with_markers = 2 + len(clip_tokenizer()(base.text, add_special_tokens=False).input_ids) + 5
    return "a " * (total_with_markers - tokens_with_markers)


def test_length_check_counts_markers_and_falls_back_to_detail_first():
    """77 tokens with markers keep the layout; 78 (only 73 without markers) switch to Detail: first."""
    fits = build_facial_prompt(_padding_words_to_reach(77), DEFAULT_FACE_CAPTION, ALL_PARTS, clip_tokenizer())
    assert fits.layout is PromptLayout.PROMPT_THEN_DETAIL
    prompt = _padding_words_to_reach(78)
    result = build_facial_prompt(prompt, DEFAULT_FACE_CAPTION, ALL_PARTS, clip_tokenizer())
    assert result.layout is PromptLayout.DETAIL_THEN_CAPTION
    assert result.marked_text == "Detail:" + TEMPLATE_MARKED + " Caption:" + prompt
    assert _facial_words(result) == ["face", "ears", "eyes", "nose", "mouth"]


def test_facial_ids_are_cut_at_77_without_eos_but_text_only_ids_keep_it():
    prompt = "a woman in a red dress on a beach at sunset, " * 6
    result = build_facial_prompt(prompt, DEFAULT_FACE_CAPTION, ALL_PARTS, clip_tokenizer())
    assert result.layout is PromptLayout.DETAIL_THEN_CAPTION
    assert result.input_ids[-1] != EOS
    assert result.text_only_input_ids[-1] == EOS
    assert result.text_only_input_ids[:-1] == result.input_ids[:-1]


def test_markers_beyond_position_76_are_lost_with_their_slots():
    caption = "a " * 60 + "face, " + "b " * 10 + "nose, eyes, mouth"
    result = build_facial_prompt("a photo", caption, {1, 4, 10, 12}, clip_tokenizer())
    assert result.marked_text.count("<|facial|>") == 4
    assert [i for i, marked in enumerate(result.facial_token_mask) if marked] == [63, 65]
    assert result.region_labels == (1, 4)


def test_face_caption_over_330_characters_drops_the_facial_path():
    long_caption = (DEFAULT_FACE_CAPTION + " ") * 5
    result = build_facial_prompt("a photo", long_caption[:331], ALL_PARTS, clip_tokenizer())
    assert result.layout is PromptLayout.WITHOUT_DETAIL
    assert result.marked_text == result.text == "a photo"
    assert result.aligned_caption == ""
    assert result.num_valid_slots == 0 and result.region_labels == ()
    kept = build_facial_prompt("a photo", long_caption[:330], ALL_PARTS, clip_tokenizer())
    assert kept.num_valid_slots == 5


def test_user_markers_in_the_prompt_are_removed_so_slots_never_exceed_five():
    prompt = "a photo <|facial|> of<|facial|> a <|image|>man " + "x <|facial|> " * 4 + "<|fac<|facial|>ial|>"
    result = build_facial_prompt(prompt, DEFAULT_FACE_CAPTION, ALL_PARTS, clip_tokenizer())
    assert result.marked_text == "a photo  of a man " + "x  " * 4 + "Detail:" + TEMPLATE_MARKED
    assert _facial_words(result) == ["face", "ears", "eyes", "nose", "mouth"]
    assert "<|" not in result.text
    assert max(result.input_ids) < 49408


def test_tokenizer_model_max_length_is_ignored():
    """ComfyUI's sd1_tokenizer says 8192; the result is the same as with 77."""
    prompt = "a woman in a red dress on a beach at sunset, " * 6
    short = build_facial_prompt(prompt, DEFAULT_FACE_CAPTION, ALL_PARTS, clip_tokenizer(77))
    long = build_facial_prompt(prompt, DEFAULT_FACE_CAPTION, ALL_PARTS, clip_tokenizer(8192))
    assert long == short


def test_inputs_and_tokenizer_are_not_modified():
    tokenizer = clip_tokenizer()
    size, added = len(tokenizer), dict(tokenizer.get_added_vocab())
    labels = {1, 4, 5, 7, 10, 12}
    build_facial_prompt("a photo", DEFAULT_FACE_CAPTION, labels, tokenizer)
    assert labels == {1, 4, 5, 7, 10, 12}
    assert len(tokenizer) == size and tokenizer.get_added_vocab() == added
    assert tokenizer.convert_tokens_to_ids("<|facial|>") == tokenizer.unk_token_id


def test_default_caption_and_sdxl_prefix():
    result = build_facial_prompt("a man", None, ALL_PARTS, clip_tokenizer(), detail_prefix=SDXL_DETAIL_PREFIX)
    assert result.marked_text == "a man; Detail:" + TEMPLATE_MARKED


def test_result_is_frozen_and_hashable():
    result = build_facial_prompt("a man", None, ALL_PARTS, clip_tokenizer())
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.text = "x"
    assert hash(result) == hash(build_facial_prompt("a man", None, ALL_PARTS, clip_tokenizer()))


@pytest.mark.parametrize(
    "prompt, caption, labels",
    [(None, "face", {1}), ("a", 3, {1}), ("a", "face", {"skin"})],
)
def test_bad_arguments_raise_prompt_error(prompt, caption, labels):
    with pytest.raises(PromptError):
        build_facial_prompt(prompt, caption, labels, clip_tokenizer())


def test_marker_sets_the_mask_on_the_token_before_it():
    ids, mask = encode_marked_text("one nose <|facial|>, eyes <|facial|>", clip_tokenizer())
    assert ids[:6] == (49406, 637, 8231, 267, 3095, EOS)
    assert [i for i, marked in enumerate(mask) if marked] == [2, 4]


def test_facial_token_slots_pad_to_five_and_reject_more():
    assert facial_token_slots([False, True, False, True]) == ((1, 3, 0, 0, 0), (True, True, False, False, False))
    with pytest.raises(PromptError):
        facial_token_slots([True] * 6)
