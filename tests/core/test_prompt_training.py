"""build_training_prompt: the original dataset's caption assembly (utils.MyDataset)."""

from consistentid_core.prompt import DEFAULT_FACE_CAPTION, PromptLayout, build_training_prompt
from consistentid_core.prompt.assembly import extract_first_sentence
from tests.fixtures.clip_tokenizer import clip_tokenizer

ALL_PARTS = {1, 4, 7, 10, 12}
TEMPLATE_MARKED = (
    "The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, "
    "one nose <|facial|>, and one mouth <|facial|>,"
)


def test_first_sentence_includes_its_period_and_is_stripped():
    assert extract_first_sentence("  A man. Outdoors") == "A man."
    assert extract_first_sentence(" no period ") == "no period"


def test_caption_then_detail_then_rest_without_the_last_character():
    """'Caption:' + first sentence + ' Detail:' + marked caption + caption[len(first):-1]."""
    result = build_training_prompt(
        DEFAULT_FACE_CAPTION, "A woman smiling. She wears a red scarf.", ALL_PARTS, clip_tokenizer()
    )
    assert result.layout is PromptLayout.CAPTION_THEN_DETAIL
    assert result.marked_text == "Caption:A woman smiling. Detail:" + TEMPLATE_MARKED + " She wears a red scarf"
    assert result.region_labels == (1, 4, 7, 10, 12)


def test_rest_is_cut_at_the_stripped_first_sentence_length():
    """Leading spaces shift the cut: the original slices the raw caption by the stripped length."""
    result = build_training_prompt("Her nose is straight.", "  A man. Outdoors", {10}, clip_tokenizer())
    assert result.marked_text == "Caption:A man. Detail:Her nose <|facial|> is straight,n. Outdoor"


def test_too_long_training_text_puts_detail_first_with_the_whole_caption():
    caption = "A woman in a red dress standing on a beach at sunset, highly detailed. " * 3
    result = build_training_prompt(DEFAULT_FACE_CAPTION, caption, ALL_PARTS, clip_tokenizer())
    assert result.layout is PromptLayout.DETAIL_THEN_CAPTION
    assert result.marked_text == "Detail:" + TEMPLATE_MARKED + " Caption:" + caption
    assert result.num_valid_slots == 5


def test_marked_caption_over_340_characters_leaves_the_caption_alone():
    """Training measures the marked caption (inference measures the raw one, at 330)."""
    detail = "The face is oval and " + "very " * 60 + "soft, the nose is small."
    result = build_training_prompt(detail, "A portrait.", {1, 10}, clip_tokenizer())
    assert result.layout is PromptLayout.WITHOUT_DETAIL
    assert result.marked_text == "A portrait."
    assert result.num_valid_slots == 0 and result.region_labels == ()


def test_text_dropout_gives_empty_text_and_no_slots():
    result = build_training_prompt(DEFAULT_FACE_CAPTION, "A woman.", ALL_PARTS, clip_tokenizer(), drop_text=True)
    assert result.layout is PromptLayout.TEXT_DROPPED
    assert result.marked_text == ""
    assert result.input_ids == (49406,) + (49407,) * 76
    assert result.valid_region_mask == (False,) * 5


def test_markers_in_the_general_caption_are_removed():
    result = build_training_prompt(DEFAULT_FACE_CAPTION, "A <|facial|>woman.", ALL_PARTS, clip_tokenizer())
    assert result.marked_text.startswith("Caption:A woman. Detail:")
    assert result.num_valid_slots == 5
