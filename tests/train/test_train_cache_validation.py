"""Feature cache and validation on ComfyUI's UNet (tiny SD1.5): same loss cached or not, the trainer
streams the cache, validation is logged at its steps and the best adapter is the best step's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from tests.fixtures.tiny_training import RESOLUTION, overrides, training_module


def _config(comfy, data, out, **train):
    from train.config import load_config

    return load_config(None, overrides(comfy, data, out, **train))


@pytest.fixture(scope="module")
def cached(comfy, data, tmp_path_factory):
    """A float32 cache of the synthetic set (2 identities held out) in shards of 2 samples."""
    from train.cache import build_cache

    folder = tmp_path_factory.mktemp("cache")
    config = _config(comfy, data, folder / "unused")
    config.data.validation_identities = 2
    build_cache(config, folder, shard_size=2, dtype="float32", batch_size=2)
    return folder, config


@pytest.mark.parametrize("drop", [False, True])
def test_cached_features_give_the_same_loss_as_encoding_on_the_fly(comfy, data, cached, drop):
    from consistentid_core.data import DataRoots, FGIDDataset, SampleOptions, collate, read_fgid
    from train.shards import ShardStream
    from train.step import step_generator

    folder, _ = cached
    stream = ShardStream(folder, 2, drop_prob=1.0 if drop else 0.0, shuffle_buffer=1)
    cached_batch = next(iter(stream))
    module = training_module(comfy)
    root = data.parent
    roots = DataRoots.of(root / "resize_IMG", root / "parsing_mask_IMG", root / "faceID")
    records = {r.index: r for r in read_fgid(data).records}
    dataset = FGIDDataset([records[i] for i in cached_batch["index"]], roots, module.host.tokenizer, SampleOptions(size=RESOLUTION), drop_prob=1.0 if drop else 0.0)
    fresh_batch = collate([dataset[i] for i in range(2)])
    assert bool(cached_batch["dropped"].all()) is drop and bool(fresh_batch["dropped"].all()) is drop
    generator = lambda: step_generator(0, 3, 0, 0, torch.device("cpu"))  # noqa: E731  (same noise, timesteps, coin)
    with torch.no_grad():
        fresh = module(fresh_batch, generator())
        from_cache = module(cached_batch, generator())
    for name in ("loss", "noise_loss", "facial_loss"):
        assert float(from_cache[name]) == pytest.approx(float(fresh[name]), rel=1e-5, abs=1e-7), name
    assert float(fresh["facial_loss"]) != 0 or drop  # the localization term is exercised


def test_cache_holds_the_training_identities_only_and_refuses_another_setting(comfy, data, cached):
    from consistentid_core.data import read_fgid
    from train.cache import CacheMismatch, open_cache, read_index
    from train.shards import ShardStream
    from train.split import identity_of, split_by_identity

    folder, config = cached
    split = split_by_identity(read_fgid(data).records, 2, 0)
    index = read_index(folder)
    assert index["samples"] == len(split.train) == 4 and len(index["shards"]) == 2
    stream = ShardStream(folder, 1, drop_prob=0.0)
    rows = [b["index"][0] for _, b in zip(range(4), stream)]
    assert sorted(rows) == sorted(r.index for r in split.train)
    assert not {identity_of(r) for r in split.train} & set(split.held_out_identities)
    config.data.cache = str(folder)
    assert open_cache(config, "sd15", split) == folder
    config.data.resolution = 64
    with pytest.raises(CacheMismatch, match="resolution"):
        open_cache(config, "sd15", split)
    config.data.resolution = RESOLUTION
    with pytest.raises(CacheMismatch, match="held_out"):
        open_cache(config, "sd15", split_by_identity(read_fgid(data).records, 1, 0))


def test_fit_trains_from_the_cache_validates_on_schedule_and_keeps_the_best_adapter(comfy, data, cached, tmp_path):
    from train.fit import run
    from train.tracking import VALIDATION_FILE, read_metrics

    folder, _ = cached
    out = tmp_path / "run"
    config = _config(comfy, data, out, max_steps=5, checkpoint_every=1, keep_checkpoints=10, validation_every=2, validation_samples=3)
    config.data.cache = str(folder)
    config.data.validation_identities = 2
    run(config)
    metrics = read_metrics(out)
    assert [m["step"] for m in metrics] == [1, 2, 3, 4, 5] and all(m["loss"] > 0 for m in metrics)
    validation = read_metrics(out, VALIDATION_FILE)
    assert [v["step"] for v in validation] == [2, 4, 5]
    losses = {v["step"]: v["validation/loss"] for v in validation}
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["metric"] == "validation/loss" and best["step"] == min(losses, key=losses.get)
    from consistentid_core import ConsistentIDAdapter

    best_weights = ConsistentIDAdapter.load(out / "best" / "consistentid_adapter.safetensors").state_dict()
    at_best = load_file(out / "checkpoints" / f"step-{best['step']:08d}" / "model.safetensors")
    key = "facial.fuse_module.layer_norm.weight"
    assert torch.equal(best_weights[key], at_best[f"adapter.{key}"])
    if best["step"] != 5:
        last = load_file(out / "checkpoints" / "step-00000005" / "model.safetensors")
        assert not torch.equal(best_weights[key], last[f"adapter.{key}"])


def test_with_ema_validation_scores_and_best_keeps_the_ema_weights(comfy, data, tmp_path):
    """The EMA is what the final adapter and the export ship, so it is what validation must rank."""
    from consistentid_core import ConsistentIDAdapter
    from consistentid_core.data import DataRoots, read_fgid
    from train.fit import run
    from train.split import split_by_identity
    from train.tracking import VALIDATION_FILE, read_metrics
    from train.validation import Validator

    out = tmp_path / "run"
    config = _config(comfy, data, out, max_steps=4, checkpoint_every=2, validation_every=2, validation_samples=3, ema_decay=0.5)
    config.data.validation_identities = 2
    run(config)
    validation = {v["step"]: v["validation/loss"] for v in read_metrics(out, VALIDATION_FILE)}
    assert sorted(validation) == [2, 4]
    best = json.loads((out / "best" / "best.json").read_text())
    assert best["weights"] == "ema"
    checkpoint = out / "checkpoints" / f"step-{best['step']:08d}"
    ema, live = load_file(checkpoint / "ema.safetensors"), load_file(checkpoint / "model.safetensors")
    best_weights = ConsistentIDAdapter.load(out / "best" / "consistentid_adapter.safetensors").state_dict()
    key = "id_projection.proj.0.weight"
    assert torch.equal(best_weights[key], ema[f"adapter.{key}"]) and not torch.equal(ema[f"adapter.{key}"], live[f"adapter.{key}"])

    # The logged validation loss is the EMA's, recomputed here on a fresh module holding those weights.
    module = training_module(comfy)
    root = data.parent
    roots = DataRoots.of(root / "resize_IMG", root / "parsing_mask_IMG", root / "faceID")
    validator = Validator(config, split_by_identity(read_fgid(data).records, 2, 0).held_out, roots, module.host.tokenizer, tmp_path / "again")
    losses = {}
    for weights, state in (("ema", load_file(out / "checkpoints" / "step-00000004" / "ema.safetensors")),
                           ("live", load_file(out / "checkpoints" / "step-00000004" / "model.safetensors"))):
        assert not module.load_state_dict(state, strict=False).unexpected_keys
        losses[weights] = validator.loss(module)["validation/loss"]
    assert validation[4] == pytest.approx(losses["ema"], rel=1e-6)
    assert abs(losses["ema"] - losses["live"]) > 1e-6 * losses["live"]


def test_validation_loss_is_deterministic_and_the_grid_is_scored(comfy, data, tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from consistentid_core.data import DataRoots, read_fgid
    from tests.fixtures.clip_tokenizer import clip_tokenizer
    from train.split import split_by_identity
    from train.validation import Validator

    clip = tmp_path / "clip"
    torch.manual_seed(0)
    CLIPModel(CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 77},
        vision_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2, "image_size": 32, "patch_size": 8},
        projection_dim=16,
    )).save_pretrained(clip)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=clip_tokenizer()).save_pretrained(clip)
    config = _config(comfy, data, tmp_path / "run", validation_grid=2, sample_steps=2, validation_samples=4,
                     validation_insightface_root=str(comfy.models_dir / "insightface"), validation_insightface_name="buffalo_l",
                     validation_clip_model=str(clip))
    module = training_module(comfy)
    root = data.parent
    roots = DataRoots.of(root / "resize_IMG", root / "parsing_mask_IMG", root / "faceID")
    held_out = split_by_identity(read_fgid(data).records, 2, 0).held_out
    validator = Validator(config, held_out, roots, module.host.tokenizer, tmp_path / "run")
    first, second = validator.loss(module), validator.loss(module)
    assert first == second and first["validation/loss"] > 0
    halves = [validator.loss(module, rank, 2) for rank in range(2)]  # two processes' shares average to the whole
    assert sum(len(p) for _, p in validator.batches(0, 2) + validator.batches(1, 2)) == 4
    assert validator.batches(0, 2)[0][0] == 0 and validator.batches(1, 2)[0][0] == 1
    assert min(h["validation/loss"] for h in halves) <= first["validation/loss"] <= max(h["validation/loss"] for h in halves)
    scores = validator.grid_scores(module, step=7)
    assert set(scores) == {"validation/FaceSim", "validation/CLIP-T"}
    images = sorted((tmp_path / "run" / "validation" / "step-00000007").rglob("*.png"))
    assert len(images) == 2 * len(config.train.validation_prompts)


def test_resume_from_the_cache_stream_reproduces_the_uninterrupted_weights(comfy, data, cached, tmp_path):
    """The stream position is recomputed from the step: 3 + 2 steps end where 5 straight steps end."""
    from train.checkpointing import find_checkpoint
    from train.fit import run

    folder, _ = cached
    for name, steps in (("straight", [5]), ("interrupted", [3, 5])):
        for max_steps in steps:
            config = _config(comfy, data, tmp_path / name, max_steps=max_steps, checkpoint_every=10, validation_every=100)
            config.data.cache, config.data.validation_identities, config.data.shuffle_buffer = str(folder), 2, 2
            run(config)
    straight = load_file(find_checkpoint(tmp_path / "straight", "auto") / "model.safetensors")
    resumed = load_file(find_checkpoint(tmp_path / "interrupted", "auto") / "model.safetensors")
    assert max((straight[k] - resumed[k]).abs().max().item() for k in straight) == 0.0
