"""``model.init_from`` with an IP-Adapter-FaceID-Plus file: the paper's initialisation."""

import pytest
import torch

from consistentid_core import CheckpointFormatError, ConsistentIDAdapter
from consistentid_cli.selftest.tiny_adapter import make_tiny_adapter
from tests.fixtures.tiny_ipadapter_faceid import ipadapter_faceid_plus_state, write_ipadapter_faceid_plus
from train.init_from import init_from_ipadapter_faceid, is_ipadapter_faceid

DIMS = dict(channels=(32,) * 4, cross_attention_dim=64, clip_embedding_dim=32, facial_dim=64, facial_depth=2)


def _fresh(**overrides):
    torch.manual_seed(0)
    return ConsistentIDAdapter.create("sd15", lora_rank=4, **{**DIMS, "id_depth": 4, **overrides})


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_id_projection_and_id_key_value_come_from_the_file_everything_else_stays_fresh(tmp_path, suffix):
    path = write_ipadapter_faceid_plus(tmp_path / f"ip-adapter-faceid-plus_sd15{suffix}")
    expected = ipadapter_faceid_plus_state()
    adapter = _fresh()
    before = {k: v.clone() for k, v in adapter.state_dict().items()}
    report = init_from_ipadapter_faceid(adapter, path)
    state = adapter.state_dict()
    for name, tensor in expected["image_proj"].items():
        assert torch.equal(state[f"id_projection.{name}"], tensor), name
    cross = [i for i, slot in enumerate(adapter.slots) if slot.is_cross_attention]
    assert len(cross) == 16
    for i in cross:
        assert torch.equal(state[f"layers.{i}.to_k_ip.weight"], expected["ip_adapter"][f"{i}.to_k_ip.weight"])
        assert torch.equal(state[f"layers.{i}.to_v_ip.weight"], expected["ip_adapter"][f"{i}.to_v_ip.weight"])
    untouched = [k for k in state if k.startswith("facial.") or "_lora." in k]
    assert untouched and all(torch.equal(state[k], before[k]) for k in untouched)  # FaceID's LoRA is not taken
    assert len(report.copied) == len(expected["image_proj"]) + 32 and not report.shape_mismatch


def test_tensors_of_another_shape_stay_fresh_and_are_reported(tmp_path):
    """A 2-layer resampler takes layers 0-1; ID k/v of another width are skipped, not forced."""
    path = write_ipadapter_faceid_plus(tmp_path / "faceid.bin", channels=(64,) * 4)
    adapter = _fresh(id_depth=2)
    before = adapter.state_dict()["layers.1.to_k_ip.weight"].clone()
    report = init_from_ipadapter_faceid(adapter, path)
    assert torch.equal(adapter.state_dict()["layers.1.to_k_ip.weight"], before)
    assert any(name.startswith("layers.1.to_k_ip") for name in report.shape_mismatch)
    assert "id_projection.perceiver_resampler.layers.1.0.to_q.weight" in report.copied


def test_files_that_fit_nothing_or_are_not_faceid_are_refused(tmp_path):
    path = write_ipadapter_faceid_plus(tmp_path / "faceid.bin", cross_attention_dim=128, clip_embedding_dim=48, id_embedding_dim=256)
    with pytest.raises(CheckpointFormatError, match="no ID-projection or ID key/value tensor fits"):
        init_from_ipadapter_faceid(_fresh(), path)
    release = tmp_path / "consistentid.bin"
    make_tiny_adapter("sd15").save(release)
    assert not is_ipadapter_faceid(release) and is_ipadapter_faceid(path)
    with pytest.raises(CheckpointFormatError, match="not an IP-Adapter-FaceID file"):
        init_from_ipadapter_faceid(_fresh(), release)
