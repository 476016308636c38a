"""The feature-cache stream: format round trip, per-process shards, resume at any batch, drop (no models)."""

from __future__ import annotations

import torch

from consistentid_core.data import FGIDRecord
from train.cache import PROMPT_FIELDS, apply_drop, decode_sample, encode_sample, finalize, store_dropped, store_shard
from train.shards import ShardStream, buffer_shuffle

SIZE, SLOTS = 16, 5


def _sample(row: int, valid: int) -> tuple[dict, dict]:
    g = torch.Generator().manual_seed(row)
    mask = torch.zeros(SLOTS, dtype=torch.bool)
    mask[:valid] = True
    facial = torch.zeros(SLOTS, SIZE, SIZE)
    facial[:valid] = torch.randint(0, 256, (valid, SIZE, SIZE), generator=g).float() / 255
    sample = {
        "id_embedding": torch.randn(512, generator=g), "input_ids": torch.randint(0, 1000, (77,), generator=g),
        "text_only_input_ids": torch.randint(0, 1000, (77,), generator=g), "facial_token_mask": torch.rand(77, generator=g) > 0.9,
        "facial_token_indices": torch.arange(SLOTS), "valid_region_mask": mask, "original_size": torch.tensor([SIZE, SIZE]),
        "crop_top_left": torch.tensor([0, 1]), "foreground_mask": torch.randint(0, 256, (1, SIZE, SIZE), generator=g).float() / 255,
        "facial_masks": facial,
    }
    frozen = {"latents": torch.randn(4, 2, 2, generator=g), "context": torch.randn(77, 8, generator=g), "pooled": None,
              "face_states": torch.randn(5, 6, generator=g), "region_states": torch.randn(SLOTS, 5, 6, generator=g)}
    return sample, frozen


def _record(row: int) -> FGIDRecord:
    return FGIDRecord(row, f"r{row}.png", f"r{row}_mask.png", "c.", "f.", None, f"person{row % 3}")


def _cache(folder, counts=(5, 4, 5, 3, 5)):
    row = 0
    for number, count in enumerate(counts):
        samples = []
        for _ in range(count):
            sample, frozen = _sample(row, row % 4)
            samples.append(encode_sample(sample, frozen, _record(row), torch.float32))
            row += 1
        store_shard(folder, number, samples)
    dropped, frozen = _sample(999, 0)
    store_dropped(folder, dropped, frozen, torch.float32)
    assert finalize(folder, len(counts), {"version": 1}, "float32")["samples"] == row
    return row


def test_a_sample_round_trips_exactly(tmp_path):
    sample, frozen = _sample(7, 3)
    back = decode_sample(encode_sample(sample, frozen, _record(7), torch.float32), SLOTS)
    for name in ("latents", "context", "face_states"):
        assert torch.equal(back[name], frozen[name])
    assert torch.equal(back["region_states"][:3], frozen["region_states"][:3]) and not back["region_states"][3:].any()
    for name in ("facial_masks", "foreground_mask", "id_embedding", "input_ids", "facial_token_mask", "valid_region_mask", "crop_top_left"):
        assert torch.equal(back[name], sample[name]), name
    assert back["index"] == 7 and "pooled" not in back
    half = decode_sample(encode_sample(sample, frozen, _record(7), torch.float16), SLOTS)
    assert half["face_states"].dtype == torch.float16 and torch.allclose(half["face_states"].float(), frozen["face_states"], atol=1e-2)


def test_drop_replaces_prompt_and_image_features_keeps_latents_and_identity():
    sample, frozen = _sample(3, 2)
    decoded = decode_sample(encode_sample(sample, frozen, _record(3), torch.float32), SLOTS)
    empty, empty_frozen = _sample(999, 0)
    dropped = {**{k: empty_frozen[k] for k in ("context", "face_states")}, **{k: empty[k] for k in PROMPT_FIELDS}}
    out = apply_drop(decoded, dropped)
    assert torch.equal(out["context"], empty_frozen["context"]) and torch.equal(out["face_states"], empty_frozen["face_states"])
    assert not out["valid_region_mask"].any() and not out["facial_masks"].any() and not out["region_states"].any()
    assert torch.equal(out["latents"], decoded["latents"]) and torch.equal(out["id_embedding"], decoded["id_embedding"])
    assert torch.equal(out["foreground_mask"], decoded["foreground_mask"]) and bool(out["dropped"])


def _rows(stream, batches):
    iterator = iter(stream)
    return [next(iterator)["index"] for _ in range(batches)]


def test_processes_read_disjoint_shards_and_cover_each_epoch(tmp_path):
    total = _cache(tmp_path)
    streams = [ShardStream(tmp_path, 1, rank, 2, seed=3, drop_prob=0.0, shuffle_buffer=3) for rank in range(2)]
    for epoch in range(3):
        owned = [set(s.epoch_shards(epoch)) for s in streams]
        assert not owned[0] & owned[1] and owned[0] | owned[1] == set(range(5))
    first_epoch = [sum(_rows(s, s.samples_in_epoch(0)), []) for s in streams]
    assert sorted(first_epoch[0] + first_epoch[1]) == list(range(total))
    # the next epoch reorders the shards and the samples within them
    again = sum(_rows(streams[0], streams[0].samples_in_epoch(0) + streams[0].samples_in_epoch(1)), [])[streams[0].samples_in_epoch(0):]
    assert again != first_epoch[0] or set(streams[0].epoch_shards(1)) != set(streams[0].epoch_shards(0))


def test_resume_at_any_batch_continues_the_same_stream(tmp_path):
    _cache(tmp_path)
    straight = _rows(ShardStream(tmp_path, 3, 1, 2, seed=5, drop_prob=0.5, shuffle_buffer=4), 12)
    for start in (1, 4, 7):
        resumed = _rows(ShardStream(tmp_path, 3, 1, 2, seed=5, start_batch=start, drop_prob=0.5, shuffle_buffer=4), 12 - start)
        assert resumed == straight[start:]
    stream = ShardStream(tmp_path, 3, 1, 2, seed=5, start_batch=4, drop_prob=0.5, shuffle_buffer=4)
    epoch, position, offset = stream.locate(4 * 3)
    assert 0 <= offset < stream.shards[stream.epoch_shards(epoch)[position]][1]


def test_drop_follows_seed_epoch_and_row(tmp_path):
    _cache(tmp_path)
    batches = list(zip(range(6), ShardStream(tmp_path, 3, 0, 1, seed=1, drop_prob=0.5)))
    again = list(zip(range(6), ShardStream(tmp_path, 3, 0, 1, seed=1, drop_prob=0.5)))
    flags = [b["dropped"].tolist() for _, b in batches]
    assert flags == [b["dropped"].tolist() for _, b in again] and any(sum(flags, [])) and not all(sum(flags, []))
    for _, batch in batches:
        for i, dropped in enumerate(batch["dropped"].tolist()):
            assert bool(batch["valid_region_mask"][i].any()) is (not dropped and batch["index"][i] % 4 > 0)


def test_buffer_shuffle_is_a_seeded_permutation():
    import random

    out = list(buffer_shuffle(iter(range(20)), 5, random.Random(0)))
    assert sorted(out) == list(range(20)) and out != list(range(20))
    assert out == list(buffer_shuffle(iter(range(20)), 5, random.Random(0)))


def test_too_few_shards_for_the_processes_is_a_clear_error(tmp_path):
    import pytest

    _cache(tmp_path, counts=(2, 2))
    with pytest.raises(ValueError, match="smaller --shard-size"):
        ShardStream(tmp_path, 1, 0, 3)


def test_the_loader_reads_ahead_in_one_worker_and_keeps_the_order(tmp_path):
    from train.shards import cache_loader

    _cache(tmp_path)
    direct = _rows(ShardStream(tmp_path, 2, seed=4, drop_prob=0.3), 8)
    loader = cache_loader(ShardStream(tmp_path, 2, seed=4, drop_prob=0.3), num_workers=4, pin_memory=False)
    assert loader.num_workers == 1
    assert _rows(loader, 8) == direct
