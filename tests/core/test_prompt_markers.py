"""Caption marking: the original's process_text_with_markers behaviour, quirks included."""

import types

from consistentid_core.prompt import DEFAULT_FACE_CAPTION, mark_caption, select_part_labels
from consistentid_core.prompt.markers import normalize_caption
from consistentid_core.prompt.parts import EARS, EYES, FACE, MOUTH, NOSE

ALL_LABELS = {1, 4, 7, 10, 12}


def _mark(caption, labels=ALL_LABELS):
    return mark_caption(caption, select_part_labels(labels))


def test_select_part_labels_keeps_lower_label_of_each_pair_in_crop_order():
    """Left eye/ear and upper lip win over their partners; other classes are ignored."""
    selected = select_part_labels([13, 12, 8, 5, 4, 17, 0, 2, 10, 1])
    assert list(selected.items()) == [(FACE, 1), (EYES, 4), (EARS, 8), (NOSE, 10), (MOUTH, 12)]
    assert select_part_labels({5, 13}) == {EYES: 5, MOUTH: 13}


def test_template_caption_is_reordered_into_marker_order():
    """Clauses come face, ears, eyes, nose, mouth; the crops stay in label order."""
    marked = _mark(DEFAULT_FACE_CAPTION)
    assert marked.text == (
        "The person has one face <|facial|>, two ears <|facial|>, two eyes <|facial|>, "
        "one nose <|facial|>, and one mouth <|facial|>,"
    )
    assert marked.region_labels == (1, 4, 7, 10, 12)


def test_normalization_keeps_words_and_five_punctuation_marks_only():
    """Quotes, hyphens, colons and newlines vanish; pieces are re-joined with single spaces."""
    assert normalize_caption('A "wide"-set eye: big!\nSmall?') == "A wide set eye big ! Small ?"


def test_repeated_part_words_are_blanked_case_insensitively():
    """Later occurrences become empty strings, which leaves double spaces."""
    assert normalize_caption("eyes, Eyes and EYES nose") == "eyes ,  and  nose"


def test_marking_is_case_sensitive_and_drops_parts_whose_word_is_missing():
    """'Eyes' does not match 'eyes', so the eye region loses its slot; 'lips' is not 'mouth'."""
    marked = _mark("Her Eyes are blue, her face is round, her lips are red.")
    assert marked.text == "her face <|facial|> is round,"
    assert marked.region_labels == (1,)


def test_capitalised_first_mention_hides_the_lowercase_one():
    """'Face' counts as the first 'face' for de-duplication, so the lowercase one is removed too."""
    marked = _mark("Face shape: oval. The face is pale.", {1})
    assert marked.text == ""
    assert marked.region_labels == ()


def test_parts_without_region_are_not_marked():
    """Only parts present in the parsing get markers, whatever the caption says."""
    marked = _mark(DEFAULT_FACE_CAPTION, {10, 13})
    assert marked.text == "one nose <|facial|>, and one mouth <|facial|>,"
    assert marked.region_labels == (10, 13)


def test_caption_without_part_words_gives_empty_text():
    assert _mark("A smiling man with short hair.").text == ""


def test_clause_with_two_markers_is_kept_once_and_the_missing_marker_eats_the_last_character():
    """The nose marker is gone with the eyes clause; the original's find() == -1 path then cuts
    the text's last character ('e' of 'wide') and keeps it as its own clause."""
    marked = _mark("The eyes and the nose are small, the mouth is wide", {4, 10, 12})
    assert marked.text == (
        "The eyes <|facial|> and the nose <|facial|> are small, e, the mouth <|facial|> is wid,"
    )
    assert marked.region_labels == (4, 10, 12)


def test_missing_marker_at_text_end_can_break_a_later_marker():
    """'face' is absent: its find() == -1 path cuts the '>' off the mouth marker at the text's end;
    the broken marker then is never found, stays literal, and mouth keeps a crop but no token."""
    marked = _mark("eyes mouth", {1, 4, 12})
    assert marked.text == ">, eyes <|facial|> mouth <|mouth|,"
    assert marked.region_labels == (4, 12)


def test_clause_boundaries_ignore_exclamation_and_question_marks():
    marked = _mark("Wow! The nose? big; the rest is fine.", {10})
    assert marked.text == "Wow ! The nose <|facial|> ? big,"


def test_mark_caption_does_not_mutate_its_label_map():
    """The original deletes dropped parts from the caller's dict; we leave it untouched."""
    labels = select_part_labels(ALL_LABELS)
    frozen = types.MappingProxyType(labels)
    before = dict(labels)
    marked = mark_caption("only a nose here", frozen)
    assert labels == before
    assert marked.region_labels == (10,)
