"""``python -m train.cache --config run.yaml``: the frozen encoders' outputs, once, into tar shards.

Every training step otherwise re-encodes each sample through the VAE, the text encoder(s) and up to
six CLIP-ViT-H passes (whole image + facial crops). None of that changes during training, so this
command runs it once per training row and writes `WebDataset <https://github.com/webdataset/webdataset>`_
tar shards that :mod:`train.shards` streams back. ``train.fit`` uses the cache when ``data.cache``
finds one made for the same model, data and split, and computes on the fly otherwise.

Folder layout (``data.cache``, default ``<json folder>/feature_cache``)::

    index.json               shard names and sample counts, and what the cache was made for
    dropped.safetensors      the text/image-dropped variant (identical for every sample)
    shard-000000.tar  …      one WebDataset sample per row: features.safetensors, masks.png, meta.json
    shard-000000.json  …     written after its shard is complete (resume marker)

Per sample (``features.safetensors``): ``latents`` (VAE latent *mean*, scaled), ``context`` (+ ``pooled``
for SDXL) of the marked prompt, ``face_states`` (CLIP-ViT-H penultimate states of the whole image, or
of the background-free one per ``data.clip_image``), ``region_states`` of the valid facial crops,
the ID embedding, token ids and facial token mask/indices, sizes; the foreground mask and the facial
masks losslessly as one PNG. The classifier-free-guidance drop is decided when reading (as the
dataset does, from the seed, the epoch and the row), so one cache serves every epoch.

Only training rows go in: the held-out identities (``data.validation_identities``) are left out, and
the split is part of what ``index.json`` records. Sharded and resumable like ``train.prepare``:
``--part i/n`` (or ``auto`` under ``accelerate launch``) writes every n-th shard; finished shards are
kept; the last part to finish writes ``index.json``.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from consistentid_core.data import DataRoots, FGIDDataset, FGIDRecord, SampleOptions, collate

from .config import Config, ConfigError, load_config, sample_options
from .split import identity_of

logger = logging.getLogger("train.cache")

VERSION = 1
INDEX = "index.json"
DROPPED = "dropped.safetensors"
DEFAULT_FOLDER = "feature_cache"
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FEATURES = ("latents", "context", "pooled", "face_states")  # stored in the cache dtype
SAMPLE_FIELDS = (  # stored exactly
    "id_embedding", "input_ids", "text_only_input_ids", "facial_token_mask", "facial_token_indices",
    "valid_region_mask", "original_size", "crop_top_left",
)
PROMPT_FIELDS = ("input_ids", "text_only_input_ids", "facial_token_mask", "facial_token_indices", "valid_region_mask")


class CacheMismatch(ConfigError):
    """The feature cache was made for another model, data set, resolution or split."""


def _file_id(path: str | None) -> dict[str, Any] | None:
    if not path:
        return None
    file = Path(path)
    return {"name": file.name, "bytes": file.stat().st_size if file.is_file() else None}


def fingerprint(config: Config, base_model: str, split_fingerprint: str) -> dict[str, Any]:
    """What a cache depends on: the frozen models, the data, the resolution, the split."""
    data = config.data
    return {
        "version": VERSION,
        "base_model": base_model,
        "checkpoint": _file_id(config.model.checkpoint),
        "clip_vision": _file_id(config.model.clip_vision),
        "json": _file_id(data.json),
        "resolution": data.resolution,
        "clip_image": data.clip_image,
        "image_key": data.image_key,
        "face_caption_key": data.face_caption_key,
        "missing_id_embedding": data.missing_id_embedding,
        "pairing": config.model.pairing,
        "held_out": split_fingerprint,
    }


def cache_folder(config: Config) -> Path | None:
    """The folder ``data.cache`` names (``auto``: next to the JSON), or None when caching is off."""
    if config.data.cache is None:
        return None
    if config.data.cache == "auto":
        return Path(config.data.json).parent / DEFAULT_FOLDER
    return Path(config.data.cache)


# -------------------------------------------------------------------------------------------- format
def _masks_png(masks: torch.Tensor) -> bytes:
    """(N, S, S) masks in 0..1 that are k/255 exactly (bilinear-resized 8-bit masks) → one PNG strip."""
    values = (masks.float() * 255).round().clamp(0, 255).to(torch.uint8)
    buffer = io.BytesIO()
    Image.fromarray(values.reshape(-1, values.shape[-1]).numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _masks_from_png(data: bytes, count: int) -> torch.Tensor:
    strip = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)), dtype=np.uint8).copy())
    return strip.reshape(count, -1, strip.shape[-1]).float() / 255.0


def encode_sample(sample: dict[str, Any], frozen: dict[str, torch.Tensor | None], record: FGIDRecord, dtype: torch.dtype) -> dict[str, bytes]:
    """One WebDataset sample (tar members) from a built sample and its frozen features (batch row)."""
    tensors = {k: frozen[k].detach().to("cpu", dtype).contiguous() for k in FEATURES if frozen.get(k) is not None}
    valid = sample["valid_region_mask"].bool()
    if valid.any():
        tensors["region_states"] = frozen["region_states"][valid.to(frozen["region_states"].device)].to("cpu", dtype).contiguous()
    for name in SAMPLE_FIELDS:
        value = sample[name]
        tensors[name] = (value.to(torch.uint8) if value.dtype == torch.bool else value).contiguous()
    masks = torch.cat([sample["foreground_mask"], sample["facial_masks"]])
    meta = {"row": record.index, "identity": identity_of(record), "image": record.image}
    return {
        "__key__": f"{record.index:010d}",
        "features.safetensors": save_tensors(tensors),
        "masks.png": _masks_png(masks),
        "meta.json": json.dumps(meta).encode(),
    }


def decode_sample(raw: dict[str, bytes], slots: int) -> dict[str, Any]:
    """A stored sample back as tensors (float features as stored; the trainer casts to float32)."""
    tensors = load_tensors(raw["features.safetensors"])
    meta = json.loads(raw["meta.json"])
    masks = _masks_from_png(raw["masks.png"], slots + 1)
    valid = tensors["valid_region_mask"].bool()
    states = tensors["face_states"]
    region_states = torch.zeros(slots, *states.shape, dtype=states.dtype)
    if "region_states" in tensors:
        region_states[valid] = tensors["region_states"]
    sample = {k: tensors[k] for k in FEATURES if k in tensors}
    sample.update({k: tensors[k] for k in SAMPLE_FIELDS})
    for name in ("facial_token_mask", "valid_region_mask"):
        sample[name] = sample[name].bool()
    sample.update(region_states=region_states, foreground_mask=masks[:1], facial_masks=masks[1:], index=meta["row"], dropped=torch.tensor(False))
    return sample


def apply_drop(sample: dict[str, Any], dropped: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The sample as the dataset builds it with the text/image drop: prompt and whole-image CLIP input
    replaced by the empty ones, no facial tokens (so no crops, no facial masks); latents, masks of the
    background and the ID embedding are kept, as the original keeps them."""
    out = dict(sample)
    for name in ("context", "pooled", "face_states"):
        if name in dropped:
            out[name] = dropped[name].to(sample[name].dtype)
    for name in PROMPT_FIELDS:
        out[name] = dropped[name].bool() if name in ("facial_token_mask", "valid_region_mask") else dropped[name]
    out["region_states"] = torch.zeros_like(sample["region_states"])
    out["facial_masks"] = torch.zeros_like(sample["facial_masks"])
    out["dropped"] = torch.tensor(True)
    return out


def collate_cached(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack cached samples into the batch ``TrainingModule.forward`` reads (``pooled`` None for SD1.5)."""
    batch: dict[str, Any] = {}
    for name, value in samples[0].items():
        if isinstance(value, torch.Tensor):
            batch[name] = torch.stack([s[name] for s in samples])
    batch.setdefault("pooled", None)
    batch["index"] = [s["index"] for s in samples]
    return batch


def read_index(folder: Path) -> dict[str, Any]:
    path = folder / INDEX
    if not path.is_file():
        raise FileNotFoundError(f"{folder} has no {INDEX}: not a finished feature cache (run python -m train.cache)")
    return json.loads(path.read_text(encoding="utf-8"))


def read_dropped(folder: Path) -> dict[str, torch.Tensor]:
    return load_tensors((folder / DROPPED).read_bytes())


def check_compatible(index: dict[str, Any], expected: dict[str, Any]) -> list[str]:
    """Keys whose value differs between the cache and this run (empty: the cache fits)."""
    stored = index.get("fingerprint", {})
    return [f"{k}: cache {stored.get(k)!r}, run {v!r}" for k, v in expected.items() if stored.get(k) != v]


def open_cache(config: Config, base_model: str, split: Any) -> Path | None:
    """The cache folder to train from, or None (compute on the fly). ``auto`` falls back with a warning
    when the cache is missing or made for something else; an explicit folder must fit."""
    folder = cache_folder(config)
    if folder is None:
        return None
    explicit = config.data.cache != "auto"
    if not (folder / INDEX).is_file():
        if explicit:
            raise ConfigError(f"data.cache: {folder} holds no finished feature cache (run python -m train.cache --config ...)")
        return None
    problems = check_compatible(read_index(folder), fingerprint(config, base_model, split.fingerprint()))
    if problems:
        message = f"the feature cache {folder} was made for another setting ({'; '.join(problems)})"
        if explicit:
            raise CacheMismatch(message + "; rebuild it with python -m train.cache or set data.cache: null")
        logger.warning("%s; computing features on the fly", message)
        return None
    logger.info("training from the feature cache %s", folder)
    return folder


# -------------------------------------------------------------------------------------------- writer
def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def shard_name(number: int) -> str:
    return f"shard-{number:06d}.tar"


def plan_shards(records: Sequence[FGIDRecord], shard_size: int, seed: int = 0) -> list[list[FGIDRecord]]:
    """Rows in a seeded random order, cut into shards (a shard then mixes identities and sources)."""
    order = torch.randperm(len(records), generator=torch.Generator().manual_seed(seed)).tolist()
    shuffled = [records[i] for i in order]
    return [shuffled[i : i + shard_size] for i in range(0, len(shuffled), shard_size)]


def _marker(folder: Path, number: int) -> Path:
    return folder / shard_name(number).replace(".tar", ".json")


def store_shard(folder: Path, number: int, samples: Sequence[dict[str, bytes]]) -> None:
    """Write shard ``number`` (a WebDataset tar), then its marker: a shard with a marker is complete."""
    import webdataset as wds

    path = folder / shard_name(number)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with wds.TarWriter(str(tmp)) as writer:
        for sample in samples:
            writer.write(sample)
    os.replace(tmp, path)
    _write_atomic(_marker(folder, number), json.dumps({"count": len(samples)}).encode())


def store_dropped(folder: Path, dropped: dict[str, Any], frozen: dict[str, torch.Tensor | None], dtype: torch.dtype) -> None:
    """The dropped variant's prompt fields and features (one sample's worth; the same for all rows)."""
    tensors = {k: frozen[k].to("cpu", dtype).contiguous() for k in ("context", "pooled", "face_states") if frozen.get(k) is not None}
    tensors.update({k: (dropped[k].to(torch.uint8) if dropped[k].dtype == torch.bool else dropped[k]).contiguous() for k in PROMPT_FIELDS})
    _write_atomic(folder / DROPPED, save_tensors(tensors))


def finalize(folder: Path, shard_count: int, fingerprint_: dict[str, Any], dtype: str) -> dict[str, Any] | None:
    """Write index.json once every shard has its marker; returns the index (None while some are missing)."""
    shards = []
    for number in range(shard_count):
        marker = _marker(folder, number)
        if not marker.is_file():
            return None
        shards.append({"name": shard_name(number), "count": json.loads(marker.read_text())["count"]})
    index = {"version": VERSION, "dtype": dtype, "samples": sum(s["count"] for s in shards), "shards": shards, "fingerprint": fingerprint_}
    _write_atomic(folder / INDEX, json.dumps(index, indent=1).encode())
    return index


def build_cache(
    config: Config, folder: Path, shard_size: int = 1000, dtype: str = "float16", batch_size: int = 8,
    part: tuple[int, int] = (0, 1), host: Any = None,
) -> dict[str, Any] | None:
    """Encode every training row of ``config`` into ``folder``; returns the index when complete.

    ``host``: the frozen models, if already loaded (default: load them from ``config.model``)."""
    from .fit import load_records  # the trainer's own row selection (fit imports this module)
    from .hosts import make_host
    from .split import split_by_identity
    from .step import encode_frozen

    if dtype not in DTYPES:
        raise ConfigError(f"--dtype must be one of {', '.join(DTYPES)}")
    if host is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        host = make_host(config.model, device, torch.float16 if device.type == "cuda" else torch.float32)
    records, roots = load_records(config)
    split = split_by_identity(records, config.data.validation_identities, config.data.validation_seed)
    shards = plan_shards(split.train, shard_size)
    expected = fingerprint(config, host.base_model, split.fingerprint())
    folder.mkdir(parents=True, exist_ok=True)
    old = folder / INDEX
    if old.is_file() and check_compatible(read_index(folder), expected):
        raise CacheMismatch(f"{folder} holds a feature cache for another setting ({'; '.join(check_compatible(read_index(folder), expected))}); use another folder")
    dataset = FGIDDataset(split.train, roots, host.tokenizer, _options(config), drop_prob=0.0)
    position = {record.index: i for i, record in enumerate(split.train)}
    index_part, parts = part
    for number, shard in enumerate(shards):
        if number % parts != index_part or _marker(folder, number).is_file():
            continue
        samples = []
        for start in range(0, len(shard), batch_size):
            chunk = shard[start : start + batch_size]
            built = [dataset[position[r.index]] for r in chunk]
            frozen = encode_frozen(host, collate(built), config.data.clip_image)
            for row, (record, sample) in enumerate(zip(chunk, built)):
                samples.append(encode_sample(sample, {k: None if v is None else v[row] for k, v in frozen.items()}, record, DTYPES[dtype]))
        store_shard(folder, number, samples)
        logger.info("shard %d/%d: %d samples", number + 1, len(shards), len(samples))
    if not (folder / DROPPED).is_file():
        dropped = _dropped_sample(split.train[0], roots, host.tokenizer, config)
        frozen = encode_frozen(host, collate([dropped]), config.data.clip_image)
        store_dropped(folder, dropped, {k: None if v is None else v[0] for k, v in frozen.items()}, DTYPES[dtype])
    index = finalize(folder, len(shards), expected, dtype)
    if index is None:
        logger.info("part %d/%d done; index.json is written by the last part to finish", index_part, parts)
    else:
        logger.info("feature cache %s: %d samples in %d shards", folder, index["samples"], len(index["shards"]))
    return index


def _options(config: Config) -> SampleOptions:
    return sample_options(config)


def _dropped_sample(record: FGIDRecord, roots: DataRoots, tokenizer: Any, config: Config) -> dict[str, Any]:
    from consistentid_core.data import build_sample

    return build_sample(record, roots, tokenizer, True, _options(config))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.cache", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n\n", 1)[1])
    parser.add_argument("--config", required=True, help="the training config (model, data and split are read from it)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--out", help="cache folder (default: data.cache, or <json folder>/feature_cache)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000, ~4 GB at 512 px float16)")
    parser.add_argument("--dtype", default="float16", choices=sorted(DTYPES), help="storage type of the features (default float16)")
    parser.add_argument("--batch-size", type=int, default=8, help="samples per encoder call")
    parser.add_argument("--part", default="0/1", help="i/n: write every n-th shard starting at i; auto: from accelerate/torchrun")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from .prepare import parse_shard

    try:
        config = load_config(args.config, args.set)
        folder = Path(args.out) if args.out else cache_folder(config)
        if folder is None:
            parser.error("data.cache is null; give --out")
        build_cache(config, folder, args.shard_size, args.dtype, args.batch_size, parse_shard(args.part))
    except ConfigError as error:
        parser.error(str(error))


if __name__ == "__main__":
    main()
