"""consistentid_core.base_models: the one table of per-base-model behaviour, and the code that asks it."""

import pytest
import torch

from consistentid_core import ConsistentIDAdapter
from consistentid_core.base_models import (
    BASE_MODELS,
    base_model_spec,
    display_name,
    release_files_hint,
    spec_for_text_encoders,
)
from consistentid_core.checkpoint.layout import processor_slots, topology_for
from consistentid_core.prompt import build_facial_prompt, encode_plain_text
from tests.fixtures.clip_tokenizer import clip_tokenizer

ALL_PARTS = {1, 4, 5, 7, 8, 10, 11, 12, 13}


@pytest.mark.parametrize("name", sorted(BASE_MODELS))
def test_each_base_model_is_found_again_from_its_processor_count(name):
    spec = base_model_spec(name)
    assert spec.name == name
    assert topology_for(len(processor_slots(spec.topology))) is spec.topology


def test_unknown_base_model_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown base model 'sd2'; ConsistentID knows sd15, sdxl"):
        base_model_spec("sd2")
    with pytest.raises(ValueError, match="unknown base model"):
        ConsistentIDAdapter.create("flux")


def test_display_names_and_file_hint():
    assert display_name("sd15") == "SD1.5"
    assert display_name("sdxl") == "SDXL"
    assert display_name("sd3") == "sd3"
    assert display_name(None, unknown="another model") == "another model"
    assert release_files_hint() == "ConsistentID-v1.bin for SD1.5, ConsistentID_SDXL-v1.bin for SDXL"


def test_base_model_from_comfyui_text_encoder_keys():
    assert spec_for_text_encoders(["l"]) is BASE_MODELS["sd15"]
    assert spec_for_text_encoders({"g": 0, "l": 0}) is BASE_MODELS["sdxl"]
    assert spec_for_text_encoders(["l", "t5xxl"]) is None
    assert not BASE_MODELS["sd15"].uses_pooled_text and BASE_MODELS["sdxl"].uses_pooled_text


def test_text_only_positive_follows_each_pipeline():
    """SD1.5: the facial prompt without markers; SDXL: the user prompt alone (markers removed)."""
    tokenizer = clip_tokenizer()
    user = "a photo of a <|facial|>woman"
    sd15, sdxl = BASE_MODELS["sd15"], BASE_MODELS["sdxl"]
    prompt = build_facial_prompt(user, sd15.face_caption, ALL_PARTS, tokenizer, detail_prefix=sd15.detail_prefix)
    assert sd15.text_only_ids(prompt, user, tokenizer) == prompt.text_only_input_ids
    plain = encode_plain_text("a photo of a woman", tokenizer)
    assert sdxl.text_only_ids(prompt, user, tokenizer) == plain
    assert plain != prompt.text_only_input_ids


@pytest.mark.parametrize("name", sorted(BASE_MODELS))
def test_adapter_defaults_come_from_the_table(name, tmp_path):
    spec = base_model_spec(name)
    torch.manual_seed(0)
    channels = (32, 32, 64, 64)[: len(spec.topology.levels)]
    adapter = ConsistentIDAdapter.create(
        name, channels=channels, cross_attention_dim=64, lora_rank=2, facial_dim=64, facial_depth=1, id_depth=1
    )
    assert adapter.base_model_spec is spec
    idv, feats = torch.randn(1, 512), torch.randn(1, 257, 1280)
    assert torch.equal(adapter.id_tokens(idv, feats), adapter.id_tokens(idv, feats, shortcut=spec.id_shortcut))
    assert not torch.equal(adapter.id_tokens(idv, feats), adapter.id_tokens(idv, feats, shortcut=not spec.id_shortcut))
    adapter.save(tmp_path / "a.bin")
    saved = torch.load(tmp_path / "a.bin", weights_only=True)
    assert set(saved) == {"FacialEncoder", spec.image_proj_key, "adapter_modules"}
