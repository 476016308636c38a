"""Describe face: caption cleaning, model-folder checks, and a tiny random LLaVA run end to end."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from consistentid_core.caption import (
    FACE_INSTRUCTION, FaceCaptioner, clean_caption, describe_face, vlm_folder_problem,
)
from consistentid_core.errors import MissingModelError, ModelMismatch
from consistentid_core.prompt import DEFAULT_FACE_CAPTION
from tests.fixtures.tiny_vlm import build_tiny_vlm, tiny_tokenizer

@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory) -> Path:
    return build_tiny_vlm(tmp_path_factory.mktemp("LLM") / "tiny-llava")


@pytest.fixture(scope="module")
def captioner(tiny_vlm) -> FaceCaptioner:
    return FaceCaptioner.load(tiny_vlm)


PHOTO = np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8)


def test_clean_caption_strips_echo_roles_and_markup():
    """Echoed instruction, role prefix, list bullets, markdown and prompt-syntax characters are removed."""
    raw = f"{FACE_INSTRUCTION}\nASSISTANT: **Face:** (round) face.\n- Eyes: large [brown] eyes.\n1. Nose: <small> nose."
    assert clean_caption(raw) == "Face: round face. Eyes: large brown eyes. Nose: small nose."


def test_clean_caption_drops_sentence_cut_by_token_limit():
    """An answer cut off mid-sentence keeps only its complete sentences."""
    assert clean_caption("She has green eyes. Her nose is small and") == "She has green eyes."


def test_clean_caption_keeps_whole_sentences_within_limit():
    """Long answers keep whole sentences up to the 330-character limit the facial prompt allows."""
    sentence = "The person has a straight nose and a wide mouth with full lips. "
    cleaned = clean_caption(sentence * 10)
    assert len(cleaned) <= 330 and cleaned.endswith("lips.")
    assert cleaned.count("straight nose") == 330 // len(sentence)


def test_clean_caption_cuts_one_long_sentence_at_a_word():
    """A single sentence over the limit is cut at a word boundary and closed with a period."""
    cleaned = clean_caption("word " * 100, max_chars=32)
    assert cleaned == "word word word word word word." and len(cleaned) <= 32


def test_clean_caption_of_nothing_is_empty():
    """Markup-only answers clean to an empty string (the caller falls back to the template)."""
    assert clean_caption("**  ** \n - ") == ""


@pytest.mark.parametrize(
    ("layout", "expected"),
    [
        ("missing", "does not exist"),
        ("nested", "one folder too deep"),
        ("cache", "Hugging Face cache entry"),
        ("no_weights", "no weights"),
    ],
)
def test_folder_problems_are_named(tmp_path, tiny_vlm, layout, expected):
    """Missing folder, nested model, HF cache layout and missing weights each get their own reason."""
    folder = tmp_path / "llava"
    if layout == "nested":
        shutil.copytree(tiny_vlm, folder / "llava")
    elif layout == "cache":
        (folder / "snapshots" / "abc").mkdir(parents=True)
    elif layout == "no_weights":
        shutil.copytree(tiny_vlm, folder)
        (folder / "model.safetensors").unlink()
    assert expected in vlm_folder_problem(folder)


def test_absent_model_raises_missing_model_naming_the_folder(tmp_path):
    """Loading an absent model folder raises MissingModelError naming models/LLM/<name> and the path."""
    with pytest.raises(MissingModelError, match=r"models/LLM/llava-1\.5-7b-hf/ \(.*llava-1\.5-7b-hf\).*huggingface-cli download"):
        FaceCaptioner.load(tmp_path / "llava-1.5-7b-hf")


def test_text_only_model_is_refused(tmp_path):
    """A language model without vision (not image-text-to-text) is a ModelMismatch, not a traceback."""
    from transformers import CLIPImageProcessor, LlamaConfig, LlamaForCausalLM

    folder = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    CLIPImageProcessor().save_pretrained(folder)
    with pytest.raises(ModelMismatch, match="not an image-text-to-text model"):
        FaceCaptioner.load(folder)


def test_tiny_model_describes_deterministically(captioner):
    """The real generate path runs offline; greedy decoding gives the same cleaned caption twice."""
    first = captioner.describe(PHOTO, max_new_tokens=8)
    assert first == captioner.describe(PHOTO, max_new_tokens=8)
    assert first == "" or first.endswith(".")


def test_instruction_reaches_the_model(captioner, monkeypatch):
    """The chat prompt holds the image tokens and the original instruction; only new tokens are decoded."""
    seen = {}

    def fake_generate(**inputs):
        seen.update(inputs)
        answer = captioner.processor.tokenizer(" the person has large brown eyes", add_special_tokens=False, return_tensors="pt")
        return torch.cat([inputs["input_ids"], answer["input_ids"]], dim=1)

    monkeypatch.setattr(captioner.model, "generate", lambda **kw: fake_generate(**kw))
    assert captioner.generate(PHOTO) == "the person has large brown eyes"
    prompt = captioner.processor.tokenizer.decode(seen["input_ids"][0])
    assert FACE_INSTRUCTION in prompt and prompt.count("<image>") == 4  # 2x2 patches of the 28 px tower
    assert seen["pixel_values"].shape == (1, 3, 28, 28)


def test_plain_prompt_without_chat_template(captioner, monkeypatch):
    """A processor without a chat template gets LLaVA-1.5's 'USER: <image> ... ASSISTANT:' prompt."""
    seen = {}
    monkeypatch.setattr(captioner.processor, "chat_template", None)
    monkeypatch.setattr(captioner.model, "generate", lambda **kw: seen.update(kw) or kw["input_ids"])
    captioner.generate(PHOTO)
    prompt = captioner.processor.tokenizer.decode(seen["input_ids"][0])
    assert prompt.startswith("USER: <image>") and prompt.endswith(f"{FACE_INSTRUCTION} ASSISTANT:")


def test_template_without_model():
    """No captioner: the template caption, always."""
    assert describe_face(PHOTO) == DEFAULT_FACE_CAPTION


def test_unusable_answer_falls_back_to_template(captioner, monkeypatch, caplog):
    """An answer that cleans to nothing gives the template and a warning naming the model."""
    monkeypatch.setattr(captioner, "generate", lambda *a, **k: "** **")
    with caplog.at_level(logging.WARNING):
        assert describe_face(PHOTO, captioner) == DEFAULT_FACE_CAPTION
    assert "tiny-llava gave no usable face description" in caplog.text


def test_progress_reports_every_token(captioner):
    """The progress callback sees 1..n tokens of max_new_tokens (drives ComfyUI's bar and Cancel)."""
    calls = []
    captioner.generate(PHOTO, max_new_tokens=5, progress=lambda done, total: calls.append((done, total)))
    assert calls and calls[-1][1] == 5
    assert [done for done, _ in calls] == list(range(1, len(calls) + 1))
