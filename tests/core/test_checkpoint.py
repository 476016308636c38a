"""Checkpoint I/O: the release layouts, round trips, dtypes, and clear errors on bad files."""

import collections
import csv
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from consistentid_core import CheckpointFormatError, ConsistentIDAdapter, MissingModelError
from consistentid_core.checkpoint import SD15, SDXL, processor_slots
from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("name,topology", [("sd15", SD15), ("sdxl", SDXL)])
def test_processor_slots_match_layout_generated_from_original_classes(name, topology):
    """Index → diffusers name → ComfyUI module/patch key, as dumped from the original pipeline."""
    rows = list(csv.DictReader(open(DATA / f"ckpt-processors-{name}.tsv"), delimiter="\t"))
    slots = processor_slots(topology)
    assert len(slots) == len(rows)
    for row, slot in zip(rows, slots):
        assert row["diffusers_processor"] == slot.diffusers_name + ".processor"
        assert row["comfy_module"] == slot.comfy_module
        assert row["comfy_patch_key"] == str(slot.patch_key)
        assert int(row["hidden_size"]) == slot.hidden_size
        assert int(row["heads"]) == slot.heads


def _release_shapes(name):
    shapes = {}
    for line in open(DATA / f"ckpt-keys-{name}.txt"):
        if line.startswith("#") or not line.strip():
            continue
        top, key, shape, _ = line.rstrip("\n").split("\t")
        shapes[(top, key)] = tuple(int(s) for s in shape.strip("()").split(",") if s.strip())
    return shapes


@pytest.mark.parametrize("name,proj_key", [("sd15", "image_proj"), ("sdxl", "image_proj_model")])
def test_full_size_adapter_has_exact_release_keys_and_shapes(name, proj_key):
    """create() at release dimensions reproduces every key and shape of the released file."""
    with torch.device("meta"):
        adapter = ConsistentIDAdapter.create(name)
    state = adapter.release_state_dicts()
    ours = {("FacialEncoder", k): tuple(v.shape) for k, v in state.facial_encoder.items()}
    ours.update({(proj_key, k): tuple(v.shape) for k, v in state.image_proj.items()})
    ours.update(
        {("adapter_modules", f"{i}.{k}"): tuple(v.shape) for i, p in state.adapter_modules.items() for k, v in p.items()}
    )
    assert ours == _release_shapes(name)


def _flat(state):
    out = {f"FacialEncoder.{k}": v for k, v in state.facial_encoder.items()}
    out.update({f"image_proj_model.{k}": v for k, v in state.image_proj.items()})
    out.update({f"adapter_modules.{i}.{k}": v for i, p in state.adapter_modules.items() for k, v in p.items()})
    return out


def _assert_same_weights(a: ConsistentIDAdapter, b: ConsistentIDAdapter):
    sa, sb = _flat(a.release_state_dicts()), _flat(b.release_state_dicts())
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


def _nested(adapter, proj_key):
    state = adapter.release_state_dicts()
    return {
        "FacialEncoder": state.facial_encoder,
        proj_key: state.image_proj,
        "adapter_modules": {f"{i}.{k}": v for i, p in state.adapter_modules.items() for k, v in p.items()},
    }


@pytest.mark.parametrize("proj_key", ["image_proj", "image_proj_model"])
def test_release_bin_with_either_image_proj_key_loads(tmp_path, proj_key):
    """The SD1.5 release uses 'image_proj', convert_weights.py and SDXL 'image_proj_model'."""
    adapter = make_tiny_adapter()
    torch.save(_nested(adapter, proj_key), tmp_path / "ConsistentID-v1.bin")
    loaded = ConsistentIDAdapter.load(tmp_path / "ConsistentID-v1.bin")
    assert loaded.base_model == "sd15"
    assert (loaded.lora_rank, loaded.num_tokens, loaded.cross_attention_dim) == (4, 4, 64)
    assert (loaded.clip_embedding_dim, loaded.id_embedding_dim) == (32, 512)
    _assert_same_weights(adapter, loaded)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
@pytest.mark.parametrize("base_model", ["sd15", "sdxl"])
def test_save_load_save_round_trip_is_exact(tmp_path, suffix, base_model):
    """load(save(x)) has identical tensors and outputs; a second save reloads identically too."""
    adapter = make_tiny_adapter(base_model)
    adapter.save(tmp_path / f"a{suffix}")
    once = ConsistentIDAdapter.load(tmp_path / f"a{suffix}")
    once.save(tmp_path / f"b{suffix}")
    twice = ConsistentIDAdapter.load(tmp_path / f"b{suffix}")
    _assert_same_weights(adapter, once)
    _assert_same_weights(adapter, twice)
    assert twice.base_model == base_model
    idv, feats = torch.randn(1, 512), torch.randn(1, 257, 32)
    # identical weights; memory alignment of loaded tensors may change SIMD summation order
    assert torch.allclose(adapter.id_tokens(idv, feats), twice.id_tokens(idv, feats), rtol=1e-5, atol=1e-5)


def test_saved_bin_uses_the_key_the_original_loader_reads(tmp_path):
    """SD1.5 .bin → 'image_proj' (original SD1.5 loader); SDXL → 'image_proj_model'."""
    for base_model, key in (("sd15", "image_proj"), ("sdxl", "image_proj_model")):
        make_tiny_adapter(base_model).save(tmp_path / f"{base_model}.bin")
        raw = torch.load(tmp_path / f"{base_model}.bin", weights_only=True)
        assert set(raw) == {"FacialEncoder", key, "adapter_modules"}
        assert "0.to_q_lora.down.weight" in raw["adapter_modules"]


def test_flat_safetensors_uses_release_prefixes(tmp_path):
    """The safetensors form is flat with FacialEncoder./image_proj_model./adapter_modules. prefixes."""
    from safetensors import safe_open

    make_tiny_adapter().save(tmp_path / "a.safetensors")
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        prefixes = {k.split(".", 1)[0] for k in f.keys()}
        assert f.metadata()["base_model"] == "sd15"
    assert prefixes == {"FacialEncoder", "image_proj_model", "adapter_modules"}


def test_bf16_release_tensors_load_and_keep_or_cast_dtype(tmp_path):
    """bf16 files load as bf16 by default and cast on request."""
    adapter = make_tiny_adapter()
    nested = _nested(adapter, "image_proj")
    nested = {top: {k: v.to(torch.bfloat16) for k, v in sd.items()} for top, sd in nested.items()}
    torch.save(nested, tmp_path / "bf16.bin")
    assert ConsistentIDAdapter.load(tmp_path / "bf16.bin").dtype == torch.bfloat16
    as_fp32 = ConsistentIDAdapter.load(tmp_path / "bf16.bin", dtype=torch.float32)
    assert as_fp32.dtype == torch.float32
    ref = adapter.release_state_dicts().facial_encoder["fuse_module.mlp1.fc1.weight"]
    got = as_fp32.release_state_dicts().facial_encoder["fuse_module.mlp1.fc1.weight"]
    assert torch.equal(got, ref.to(torch.bfloat16).float())


def test_sdxl_detected_from_140_processors_and_uses_shortcut():
    """140 processors → SDXL; SDXL ID tokens include the shortcut (tokens + resampler)."""
    adapter = make_tiny_adapter("sdxl")
    assert adapter.base_model == "sdxl" and len(adapter.layers) == 140
    idv, feats = torch.randn(1, 512), torch.randn(1, 257, 32)
    assert torch.allclose(adapter.id_tokens(idv, feats), adapter.id_tokens(idv, feats, shortcut=True))
    assert not torch.allclose(adapter.id_tokens(idv, feats), adapter.id_tokens(idv, feats, shortcut=False))


def test_lora_pairs_name_comfyui_weights():
    """Every LoRA maps to a ComfyUI weight key; middle block is middle_block.1, out is to_out.0."""
    keys = [k for k, _ in make_tiny_adapter().lora_pairs()]
    assert len(keys) == 128 and len(set(keys)) == 128
    assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight" in keys
    assert "diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.weight" in keys
    assert "diffusion_model.output_blocks.11.1.transformer_blocks.0.attn2.to_v.weight" in keys


# ------------------------------------------------------------------------------------ bad files
def _error(tmp_path, name, payload) -> str:
    path = tmp_path / name
    if isinstance(payload, bytes):
        path.write_bytes(payload)
    else:
        torch.save(payload, path)
    with pytest.raises(CheckpointFormatError) as info:
        ConsistentIDAdapter.load(path)
    assert name in str(info.value)
    return str(info.value)


def test_missing_file_names_folder_and_source(tmp_path):
    with pytest.raises(MissingModelError, match="models/consistentid") as info:
        ConsistentIDAdapter.load(tmp_path / "nope.bin")
    assert "JackAILab/ConsistentID" in str(info.value)


def test_truncated_file_is_reported(tmp_path):
    make_tiny_adapter().save(tmp_path / "full.bin")
    data = (tmp_path / "full.bin").read_bytes()
    assert "truncated" in _error(tmp_path, "cut.bin", data[: len(data) // 2])


def test_truncated_safetensors_is_reported(tmp_path):
    make_tiny_adapter().save(tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    assert "truncated" in _error(tmp_path, "cut.safetensors", data[: len(data) // 3])


def test_random_bytes_and_empty_files_are_reported(tmp_path):
    assert "corrupt" in _error(tmp_path, "noise.bin", bytes(range(256)) * 40)
    assert "empty" in _error(tmp_path, "empty.bin", b"")


def test_pickled_code_is_refused(tmp_path):
    """weights_only=True: a pickle that would construct arbitrary objects is not executed."""
    payload = pickle.dumps(collections.OrderedDict(a=torch.nn.Linear(2, 2)), protocol=2)
    assert "plain tensors" in _error(tmp_path, "code.bin", payload)


def test_foreign_checkpoints_are_named(tmp_path):
    assert "PhotoMaker" in _error(tmp_path, "pm.bin", {"id_encoder": {}, "lora_weights": {}})
    assert "IP-Adapter" in _error(tmp_path, "ipa.bin", {"image_proj": {}, "ip_adapter": {}})
    assert "Load Checkpoint" in _error(tmp_path, "sd.bin", {"model.diffusion_model.x": torch.zeros(1)})


def test_missing_and_misshapen_tensors_are_listed(tmp_path):
    nested = _nested(make_tiny_adapter(), "image_proj")
    del nested["FacialEncoder"]["fuse_module.layer_norm.bias"]
    assert "fuse_module.layer_norm.bias" in _error(tmp_path, "missing.bin", nested)
    nested = _nested(make_tiny_adapter(), "image_proj")
    nested["image_proj"]["norm.weight"] = torch.zeros(3)
    assert "wrong shapes" in _error(tmp_path, "shape.bin", nested)


def test_incomplete_or_unknown_processor_sets_are_reported(tmp_path):
    nested = _nested(make_tiny_adapter(), "image_proj")
    adapters = nested["adapter_modules"]
    gap = {k: v for k, v in adapters.items() if not k.startswith("5.")}
    assert "not contiguous" in _error(tmp_path, "gap.bin", {**nested, "adapter_modules": gap})
    short = {k: v for k, v in adapters.items() if not k.startswith(("30.", "31."))}
    assert "30 attention processors" in _error(tmp_path, "short.bin", {**nested, "adapter_modules": short})


def test_flat_safetensors_from_other_tools_are_reported(tmp_path):
    save_file({"lora_unet_down.weight": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(CheckpointFormatError, match="not a ConsistentID checkpoint"):
        ConsistentIDAdapter.load(tmp_path / "lora.safetensors")
