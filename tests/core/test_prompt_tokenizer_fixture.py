"""The CLIP tokenizer fixture built from open_clip's merges equals the real SD1.5 tokenizer."""

import json

import pytest

from tests.fixtures.clip_tokenizer import clip_tokenizer, clip_vocab_and_merges, comfyui_sd1_tokenizer_path

SENTENCES = [
    "The person has one face, one nose, two eyes, two ears, and one mouth.",
    "a photo of a womanDetail:The person has one face , two ears ,",
    "über café, 東京 😀 it's a PHOTO!!  (masterpiece:1.2)",
    "",
]


def test_fixture_has_the_clip_vocabulary_layout():
    """256 byte tokens, 256 word-end byte tokens, 48894 merges, then BOS 49406 and EOS 49407."""
    tokenizer = clip_tokenizer()
    assert len(tokenizer) == 49408
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (49406, 49407, 49407)
    assert tokenizer.model_max_length == 77


def test_fixture_encodes_known_sentence_like_sd15():
    """Ids of the original's template caption, as SD1.5's tokenizer gives them."""
    ids = clip_tokenizer()(SENTENCES[0]).input_ids
    assert ids == [49406, 518, 2533, 791, 637, 1710, 267, 637, 8231, 267, 1237, 3095, 267, 1237, 9861,
                   267, 537, 637, 4932, 269, 49407]


@pytest.fixture(scope="module")
def comfyui_tokenizer_folder():
    path = comfyui_sd1_tokenizer_path()
    if path is None:
        pytest.skip("COMFYUI_PATH is unset or has no comfy/sd1_tokenizer; cannot compare with ComfyUI's tokenizer")
    return path


def test_fixture_files_equal_comfyui_sd1_tokenizer(comfyui_tokenizer_folder):
    """Vocabulary and merges are the same as the files ComfyUI ships."""
    vocab, merges = clip_vocab_and_merges()
    assert vocab == json.loads((comfyui_tokenizer_folder / "vocab.json").read_text(encoding="utf-8"))
    comfy_merges = (comfyui_tokenizer_folder / "merges.txt").read_text(encoding="utf-8").split("\n")
    assert comfy_merges[1 : len(merges) + 1] == merges


@pytest.mark.parametrize("sentence", SENTENCES)
def test_fixture_encodes_like_comfyui_sd1_tokenizer(comfyui_tokenizer_folder, sentence):
    """Same ids as a CLIPTokenizer loaded from ComfyUI's sd1_tokenizer folder."""
    from transformers import CLIPTokenizer

    comfy = CLIPTokenizer.from_pretrained(str(comfyui_tokenizer_folder))
    assert clip_tokenizer()(sentence).input_ids == comfy(sentence).input_ids
