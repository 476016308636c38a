"""Trainer plumbing without a model run: config files, checkpoint discovery, export round trip."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from consistentid_core import CheckpointFormatError, ConsistentIDAdapter
from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter
from train.checkpointing import STATE_FILE, find_checkpoint, list_checkpoints
from train.config import ConfigError, describe_defaults, load_config
from train.export import export, release_state_dicts

MODEL_FILES = ["model.checkpoint=m.safetensors", "model.clip_vision=c.safetensors"]


def test_yaml_numbers_written_as_strings_are_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: {checkpoint: m.safetensors, clip_vision: c.safetensors}\ndata: {json: x.json}\ntrain: {learning_rate: 1e-4, max_grad_norm: null}\n")
    config = load_config(path, ["train.batch_size=4", "train.adam_betas=[0.9, 0.99]"])
    assert config.train.learning_rate == 1e-4 and config.train.max_grad_norm is None
    assert config.train.batch_size == 4 and config.train.adam_betas == (0.9, 0.99)


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["train.lerning_rate=1"], "unknown key"),
        (["train.batch_size=many"], "train.batch_size must be int"),
        (["train.mixed_precision=fp8"], "mixed_precision must be one of"),
        (["train.localization_attention=attn3"], "localization_attention must be one of"),
        (["model.checkpoint=null"], "model.checkpoint and model.clip_vision are required"),
        (["train.on_shape_change=guess"], "on_shape_change must be one of"),
        (["model.pairing=mirrored"], "pairing must be one of"),
        (["train.ema_decay=1.0"], "ema_decay must be in"),
        (["train.seed=-1"], "seed must be non-negative"),
        (["train.max_steps=0"], "at least 1"),
        (["oops"], "section.key=value"),
    ],
)
def test_config_errors_name_the_key(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["data.json=x.json", *MODEL_FILES, *overrides])


def test_json_configs_and_missing_data_are_reported(tmp_path):
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"model": {"checkpoint": "m.safetensors", "clip_vision": "c.safetensors"}, "data": {"json": "a.json"}}))
    assert load_config(path).data.json == "a.json"
    with pytest.raises(ConfigError, match="data.json is required"):
        load_config(None, MODEL_FILES)


def test_defaults_reference_lists_every_key_with_its_doc():
    text = describe_defaults()
    assert "| `localization_attention` | `\"attn2\"` |" in text and "the original code's self-attention maps" in text
    assert text.count("### `") == 3


def test_training_doc_carries_the_current_defaults_table():
    doc = (Path(__file__).resolve().parents[2] / "docs" / "TRAINING.md").read_text(encoding="utf-8")
    assert describe_defaults() in doc, "docs/TRAINING.md is out of date: paste `python -m train.fit --print-defaults`"


def test_trainer_says_where_comfyui_is_looked_for(tmp_path, monkeypatch):
    from train.config import ModelConfig
    from train.hosts import comfyui_root

    monkeypatch.delenv("COMFYUI_PATH", raising=False)
    with pytest.raises(ConfigError, match="The trainer runs on ComfyUI: ComfyUI folder unknown: .*COMFYUI_PATH .*model.comfyui_path"):
        comfyui_root(ModelConfig())
    with pytest.raises(ConfigError, match=f"{tmp_path} is not a ComfyUI folder"):
        comfyui_root(ModelConfig(comfyui_path=str(tmp_path)))


def test_checkpoint_discovery_ignores_half_written_folders(tmp_path):
    root = tmp_path / "checkpoints"
    for name, complete in (("step-00000002", True), ("step-00000004", True), (".tmp-step-00000006", True), ("step-00000008", False)):
        (root / name).mkdir(parents=True)
        if complete:
            (root / name / STATE_FILE).write_text("{}")
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000002", "step-00000004"]
    assert find_checkpoint(tmp_path, "auto").name == "step-00000004"
    (root / "latest").write_text("step-00000002\n")
    assert find_checkpoint(tmp_path, "auto").name == "step-00000002"
    assert find_checkpoint(tmp_path / "empty", "auto") is None and find_checkpoint(tmp_path, None) is None
    with pytest.raises(FileNotFoundError, match="not a complete training checkpoint"):
        find_checkpoint(tmp_path, str(root / "step-00000008"))


def _training_checkpoint(tmp_path, adapter):
    checkpoint = tmp_path / "checkpoints" / "step-00000010"
    checkpoint.mkdir(parents=True)
    save_file({f"adapter.{k}": v.contiguous() for k, v in adapter.state_dict().items()}, checkpoint / "model.safetensors")
    (checkpoint / STATE_FILE).write_text("{}")
    return checkpoint


def test_export_round_trip_from_a_training_checkpoint(tmp_path):
    """accelerate's model.safetensors (``adapter.*`` keys) → .bin and .safetensors that ConsistentIDAdapter.load reads."""
    adapter = make_tiny_adapter("sd15", seed=4)
    checkpoint = _training_checkpoint(tmp_path, adapter)
    outputs = [tmp_path / "out.bin", tmp_path / "out.safetensors"]
    export(tmp_path, outputs)  # a training output folder: its latest checkpoint
    expected = adapter.state_dict()
    for path in outputs:
        loaded = ConsistentIDAdapter.load(path)
        assert loaded.base_model == "sd15"
        assert all(torch.equal(loaded.state_dict()[k], expected[k]) for k in expected)
    assert "image_proj" in torch.load(outputs[0], weights_only=True)  # the SD1.5 loader's key
    half = tmp_path / "half.safetensors"
    export(checkpoint / "model.safetensors", [half], dtype="fp16")
    assert ConsistentIDAdapter.load(half).dtype == torch.float16


def test_sdxl_export_uses_the_sdxl_loaders_key(tmp_path):
    checkpoint = _training_checkpoint(tmp_path, make_tiny_adapter("sdxl", seed=4))
    export(checkpoint, [tmp_path / "out.bin"])
    assert "image_proj_model" in torch.load(tmp_path / "out.bin", weights_only=True)


def test_export_rejects_foreign_tensors():
    with pytest.raises(CheckpointFormatError, match="unexpected tensor"):
        release_state_dicts({"unet.weight": torch.zeros(1)})


def test_export_takes_the_ema_when_the_checkpoint_has_one(tmp_path):
    from safetensors.torch import save_file

    raw, ema = make_tiny_adapter("sd15", seed=4), make_tiny_adapter("sd15", seed=5)
    checkpoint = _training_checkpoint(tmp_path, raw)
    with pytest.raises(FileNotFoundError, match="without train.ema_decay"):
        export(checkpoint, [tmp_path / "x.safetensors"], weights="ema")
    save_file({f"adapter.{k}": v.contiguous() for k, v in ema.state_dict().items()}, checkpoint / "ema.safetensors")
    for weights, source in (("auto", ema), ("ema", ema), ("raw", raw)):
        out = tmp_path / f"{weights}.safetensors"
        export(tmp_path, [out], weights=weights)
        loaded = ConsistentIDAdapter.load(out).state_dict()
        assert all(torch.equal(loaded[k], v) for k, v in source.state_dict().items()), weights
