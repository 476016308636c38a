"""Held-out split by identity and best-adapter selection (no models needed)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from consistentid_core.data import FGIDRecord, read_fgid
from train.split import identity_of, split_by_identity
from train.validation import BestCheckpoint, grid_records, validation_generator


def _records(identities):
    return [FGIDRecord(i, f"img{i}.png", f"img{i}_mask.png", "c.", "f.", None, who) for i, who in enumerate(identities)]


def test_split_holds_out_whole_identities_and_is_stable():
    names = [f"person{i % 7}" for i in range(40)] + [None] * 5  # 7 people, plus 5 photos of unknown people
    records = _records(names)
    split = split_by_identity(records, 3, seed=0)
    train_ids = {identity_of(r) for r in split.train}
    held = {identity_of(r) for r in split.held_out}
    assert len(held) == 3 and not train_ids & held
    assert len(split.train) + len(split.held_out) == len(records)
    # every photo of a held-out person is held out
    assert sum(identity_of(r) in held for r in records) == len(split.held_out)
    # independent of the row order, changed by the seed
    again = split_by_identity(list(reversed(records)), 3, seed=0)
    assert {identity_of(r) for r in again.held_out} == held and again.fingerprint() == split.fingerprint()
    others = {frozenset(identity_of(r) for r in split_by_identity(records, 3, seed=s).held_out) for s in range(6)}
    assert len(others) > 1


def test_split_fraction_zero_and_errors():
    records = _records([f"p{i}" for i in range(10)])
    assert len({identity_of(r) for r in split_by_identity(records, 0.2).held_out}) == 2
    assert len({identity_of(r) for r in split_by_identity(records, 0.01).held_out}) == 1  # a positive fraction holds out one
    assert split_by_identity(records, 0).held_out == []
    with pytest.raises(ValueError, match="at least one must stay"):
        split_by_identity(records, 10)


def test_identity_is_read_from_the_json(tmp_path):
    rows = [{"resize_IMG": "a.png", "parsing_mask_IMG": "a_mask.png", "vqa_llva": "c.", "vqa_llva_more_face_detail": "f.", "identity": 3},
            {"resize_IMG": "b.png", "parsing_mask_IMG": "b_mask.png", "vqa_llva": "c.", "vqa_llva_more_face_detail": "f."}]
    path = tmp_path / "fgid.json"
    path.write_text(json.dumps(rows))
    first, second = read_fgid(path).records
    assert first.identity == "3" and identity_of(first) == "3"
    assert second.identity is None and identity_of(second) == "image:b.png"


def test_grid_takes_one_photo_per_identity_in_name_order():
    records = _records(["b", "a", "b", "c", "a"])
    assert [r.index for r in grid_records(records, 2)] == [1, 0]


def test_validation_draws_are_fixed_per_batch():
    a = torch.randn(4, generator=validation_generator(0, 3, torch.device("cpu")))
    b = torch.randn(4, generator=validation_generator(0, 3, torch.device("cpu")))
    c = torch.randn(4, generator=validation_generator(0, 4, torch.device("cpu")))
    assert torch.equal(a, b) and not torch.equal(a, c)


class _Adapter:
    def __init__(self, tag):
        self.tag = tag

    def save(self, path):
        path.write_text(self.tag)


@pytest.mark.parametrize("metric, values, best_step", [
    ("validation/loss", [0.5, 0.3, 0.4, 0.2, 0.25], 4),
    ("validation/FaceSim", [0.1, 0.6, 0.4, 0.5, float("nan")], 2),
])
def test_best_adapter_follows_the_metric_and_survives_a_restart(tmp_path, metric, values, best_step):
    tracker = BestCheckpoint(tmp_path, metric)
    for step, value in enumerate(values[:3], 1):
        tracker.update(step, {metric: value}, _Adapter(f"step{step}"))
    tracker = BestCheckpoint(tmp_path, metric)  # resumed run reads best.json
    for step, value in enumerate(values[3:], 4):
        tracker.update(step, {metric: value}, _Adapter(f"step{step}"))
    state = json.loads((tmp_path / "best" / "best.json").read_text())
    finite = [v for v in values if not math.isnan(v)]
    assert state["step"] == best_step and state["value"] == (min(finite) if metric.endswith("loss") else max(finite))
    assert (tmp_path / "best" / "consistentid_adapter.safetensors").read_text() == f"step{best_step}"
    assert not BestCheckpoint(tmp_path, None).update(9, {metric: -1.0}, _Adapter("x"))


def test_prepare_names_the_identity_after_the_portrait_folder(tmp_path):
    from train.prepare import Item

    assert Item(tmp_path, tmp_path, "alice/001.jpg").record["identity"] == "alice"
    assert "identity" not in Item(tmp_path, tmp_path, "loose.jpg").record
