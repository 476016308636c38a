"""Node behaviour in ComfyUI: messages for bad inputs, image formats, outputs, conditioning layout."""

from __future__ import annotations

import pytest
import torch

from tests.fixtures import cid_workflows as wf

CHECKPOINT, ADAPTER, INSIGHTFACE, PARSER, CLIP_VISION, IMAGE, ENCODE, APPLY = "1", "2", "3", "4", "5", "6", "7", "8"


def _portrait(**changes) -> dict:
    """The SD1.5 portrait workflow at test size; ``changes`` = {node_id: {input: value}}."""
    prompt = wf.at_test_size(wf.load_api("sd15_portrait"))
    for node_id, inputs in changes.items():
        prompt[node_id]["inputs"].update(inputs)
    return prompt


def _first(result, node_id: str, index: int = 0):
    return result.output(node_id)[index][0]


@pytest.fixture(scope="module")
def loaded(comfy):
    """The portrait workflow's loaders and encoded face, for direct node and API calls."""
    outputs = [CHECKPOINT, ADAPTER, INSIGHTFACE, PARSER, CLIP_VISION, IMAGE, ENCODE]
    result = comfy.runner.run(_portrait(), outputs=outputs)
    assert result.success, result.error
    objects = {  # read before the next run: the executor keeps only the last prompt's outputs
        "model": _first(result, CHECKPOINT), "clip": _first(result, CHECKPOINT, 1), "consistentid": _first(result, ADAPTER),
        "adapter": _first(result, ADAPTER).adapter,
        "analysis": _first(result, INSIGHTFACE), "parser": _first(result, PARSER), "clip_vision": _first(result, CLIP_VISION),
        "image": _first(result, IMAGE), "face": _first(result, ENCODE), "parsing": _first(result, ENCODE, 1),
        "face_mask": _first(result, ENCODE, 2), "loader_ui": result.history["outputs"].get(ADAPTER, {}),
    }
    sdxl = comfy.runner.run({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "2": {"class_type": "ConsistentID_ModelLoader", "inputs": {"model_name": "ConsistentID_SDXL-v1.bin", "dtype": "auto"}},
    }, outputs=["1", "2"])
    assert sdxl.success, sdxl.error
    return {**objects, "sdxl_clip": _first(sdxl, "1", 1), "sdxl_adapter": _first(sdxl, "2").adapter}


def _encode(comfy, loaded, image, **options):
    node = comfy.nodes.NODE_CLASS_MAPPINGS["ConsistentID_EncodeFace"]
    with torch.inference_mode():  # as the executor runs nodes
        output = node.execute(
            image, loaded["analysis"], loaded["parser"], loaded["clip_vision"], loaded["consistentid"], **options
        )
    return output.args


def _error_message(result) -> str:
    assert not result.success
    assert result.error is not None, "the executor reported no error message"
    return result.error["exception_message"]


def test_no_face_stops_with_a_message_naming_the_image(comfy):
    result = comfy.runner.run(_portrait(**{IMAGE: {"image": "gray.png"}}))
    message = _error_message(result)
    assert result.error["node_id"] == ENCODE
    assert "No face detected" in message and "reference image 1 of 1" in message


def test_no_face_with_skip_passes_model_and_text_through(comfy):
    result = comfy.runner.run(_portrait(**{IMAGE: {"image": "gray.png"}, ENCODE: {"on_no_face": "skip"}}))
    assert result.success, result.error
    assert _first(result, APPLY) is _first(result, CHECKPOINT)
    positive = _first(result, APPLY, 1)
    assert len(positive) == 1 and "start_percent" not in positive[0][1]


def test_adapter_for_another_base_model_gives_a_clear_message(comfy):
    result = comfy.runner.run(_portrait(**{ADAPTER: {"model_name": "ConsistentID_SDXL-v1.bin"}}))
    message = _error_message(result)
    assert result.error["node_id"] == APPLY
    assert "Models do not match" in message and "for SDXL" in message and "CLIP is SD1.5" in message


def test_missing_model_file_names_the_folder_and_the_source(comfy):
    message = _error_message(comfy.runner.run(_portrait(**{ADAPTER: {"model_name": "ConsistentID-v2.bin"}})))
    assert "Model file missing" in message and "models/consistentid" in message and "JackAILab/ConsistentID" in message


def test_missing_insightface_pack_says_where_the_files_belong(comfy):
    message = _error_message(comfy.runner.run(_portrait(**{INSIGHTFACE: {"name": "antelopev2"}})))
    assert "models/insightface/models/antelopev2" in message


def test_loader_reports_the_base_model(loaded):
    assert "SD1.5 adapter" in str(loaded["loader_ui"])


def test_encode_face_outputs_preview_and_face_mask(loaded):
    image, parsing, mask = loaded["image"], loaded["parsing"], loaded["face_mask"]
    assert parsing.shape == (1, 512, 512, 3) and 0 <= parsing.min() and parsing.max() <= 1
    assert mask.shape == image.shape[:3] and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert loaded["face"].features.used_images == (0,)


def test_rgba_reference_gives_the_same_face_as_rgb(comfy, loaded):
    """Alpha is dropped (as PIL's convert("RGB") in the original), so the features are identical."""
    rgb = loaded["image"]
    rgba = torch.cat([rgb, torch.rand(*rgb.shape[:3], 1)], dim=-1)
    face_rgb, face_rgba = _encode(comfy, loaded, rgb)[0].features, _encode(comfy, loaded, rgba)[0].features
    assert torch.equal(face_rgb.id_embedding, face_rgba.id_embedding)
    assert torch.equal(face_rgb.face_hidden_states, face_rgba.face_hidden_states)


def test_grayscale_reference_is_read_as_gray_rgb(comfy, loaded):
    """One channel is accepted and read as gray RGB (the tiny detector finds no face in gray)."""
    gray = loaded["image"].mean(dim=-1, keepdim=True)
    with pytest.raises(RuntimeError, match="No face detected"):
        _encode(comfy, loaded, gray)
    face_gray = _encode(comfy, loaded, gray, on_no_face="skip")[0].features
    face_rgb = _encode(comfy, loaded, gray.repeat(1, 1, 1, 3), on_no_face="skip")[0].features
    assert face_gray.skipped_images == face_rgb.skipped_images == (0,)
    assert torch.equal(face_gray.uncond_face_hidden_states, face_rgb.uncond_face_hidden_states)


def test_unusable_image_gives_a_message(comfy, loaded):
    with pytest.raises(RuntimeError, match="Unusable image.*reference image 1 of 1.*channels"):
        _encode(comfy, loaded, torch.rand(1, 64, 64, 2))


def test_a_batch_of_references_is_averaged(comfy, loaded):
    image = loaded["image"]
    single = _encode(comfy, loaded, image)[0].features
    batch = _encode(comfy, loaded, torch.cat([image, image.flip(2)]))[0].features
    flipped = _encode(comfy, loaded, image.flip(2))[0].features
    mean = torch.nn.functional.normalize(single.id_embedding + flipped.id_embedding, dim=0)
    torch.testing.assert_close(batch.id_embedding, mean)
    torch.testing.assert_close(batch.face_hidden_states, (single.face_hidden_states + flipped.face_hidden_states) / 2)


def _api(comfy):
    return comfy.package.nodes.conditioning


def test_sd15_conditioning_layout(comfy, loaded):
    """Text-only before merge_at, fused after; the negative is one fused entry (SD1.5 never switches)."""
    face = loaded["face"]
    positive, negative = _api(comfy).encode_conditioning(
        loaded["clip"], loaded["adapter"], face.features, "a photo", "blurry", merge_at=0.3, face_caption=face.face_caption)
    assert [(c[1]["start_percent"], c[1]["end_percent"]) for c in positive] == [(0.0, 0.3), (0.3, 1.0)]
    assert len(negative) == 1 and "start_percent" not in negative[0][1]
    assert all(c[0].shape == (1, 77, 64) for c in positive + negative)


def test_sdxl_conditioning_layout(comfy, loaded):
    """SDXL: 2048-d style context (CLIP-L + CLIP-G), pooled output, the negative switches at merge_at."""
    positive, negative = _api(comfy).encode_conditioning(
        loaded["sdxl_clip"], loaded["sdxl_adapter"], loaded["face"].features, "a photo", "blurry")
    assert [(c[1]["start_percent"], c[1]["end_percent"]) for c in negative] == [(0.0, 0.6), (0.6, 1.0)]
    assert all(c[0].shape == (1, 77, 128) and c[1]["pooled_output"].shape == (1, 64) for c in positive + negative)


def _record_encodings(monkeypatch, clip) -> dict:
    """CLIP-L token ids → encoded features, for every encode_from_tokens call on ``clip``."""
    encoded = {}
    original = type(clip).encode_from_tokens

    def recording(self, tokens, return_pooled=False, return_dict=False):
        result = original(self, tokens, return_pooled=return_pooled, return_dict=return_dict)
        encoded[tuple(i for i, _ in tokens["l"][0])] = result[0]
        return result

    monkeypatch.setattr(type(clip), "encode_from_tokens", recording)
    return encoded


@pytest.mark.parametrize("parts", [None, ["eyes", "nose"]])
def test_fusion_touches_only_the_facial_tokens(comfy, loaded, monkeypatch, parts):
    """The fused prompt equals the CLIP encoding of our token ids except at the marked positions,
    which are those of the enabled parts."""
    from consistentid_core.face.labels import FACIAL_PART_LABELS
    from consistentid_core.prompt import build_facial_prompt

    api = _api(comfy)
    clip, face = loaded["clip"], loaded["face"]
    encoded = _record_encodings(monkeypatch, clip)
    positive, _ = api.encode_conditioning(clip, loaded["adapter"], face.features, "a photo", "",
                                          face_caption=face.face_caption, parts=parts)
    labels = [label for label in face.features.present_labels
              if parts is None or any(label in FACIAL_PART_LABELS[part] for part in parts)]
    prompt = build_facial_prompt("a photo", face.face_caption, labels, clip.tokenizer.clip_l.tokenizer)
    fused, plain = positive[1][0], encoded[prompt.input_ids]
    marked = torch.tensor(prompt.facial_token_mask)
    assert marked.sum() == len(prompt.region_labels) == len(labels) > 0
    assert torch.equal(fused[0, ~marked], plain[0, ~marked])
    assert not torch.allclose(fused[0, marked], plain[0, marked])

    unfused, _ = api.encode_conditioning(clip, loaded["adapter"], face.features, "a photo", "", facial_weight=0.0,
                                         face_caption=face.face_caption, parts=parts)
    torch.testing.assert_close(unfused[1][0], plain)


def test_an_adapter_trained_with_corrected_pairing_gets_each_part_its_own_union_crop(comfy, loaded, monkeypatch):
    """The file's ``pairing`` decides which crop each facial token is fused with (the release: original)."""
    import copy
    import dataclasses

    from consistentid_core.prompt import build_facial_prompt

    api = _api(comfy)
    clip, face = loaded["clip"], loaded["face"]
    assert loaded["adapter"].pairing == "original"
    corrected = copy.deepcopy(loaded["adapter"])
    corrected.pairing = "corrected"
    with pytest.raises(ValueError, match="encode it again"):  # a face encoded for an original adapter
        api.encode_conditioning(clip, corrected, face.features, "a photo", "", face_caption=face.face_caption)
    generator = torch.Generator().manual_seed(0)
    features = dataclasses.replace(face.features, paired_region_hidden_states={
        label: torch.randn(states.shape, generator=generator) for label, states in face.features.region_hidden_states.items()})
    encoded = _record_encodings(monkeypatch, clip)
    positive, _ = api.encode_conditioning(clip, corrected, features, "a photo", "", face_caption=face.face_caption)
    prompt = build_facial_prompt("a photo", face.face_caption, features.present_labels, clip.tokenizer.clip_l.tokenizer, pairing="corrected")
    regions = torch.stack([features.paired_region_hidden_states[label] for label in prompt.region_labels])
    regions = torch.cat([regions, features.uncond_region_hidden_states.expand(5 - len(regions), -1, -1)])[None]
    with torch.no_grad():
        expected = corrected.facial_encoder(encoded[prompt.input_ids], regions, torch.tensor([prompt.facial_token_mask]),
                                            torch.tensor([prompt.valid_region_mask]))
    torch.testing.assert_close(positive[1][0], expected.to(positive[1][0].dtype))
    original, _ = api.encode_conditioning(clip, loaded["adapter"], features, "a photo", "", face_caption=face.face_caption)
    assert not torch.allclose(original[1][0], positive[1][0])


def test_sdxl_clip_g_ids_are_padded_like_its_tokenizer(comfy, loaded, monkeypatch):
    clip = loaded["sdxl_clip"]
    seen = []
    original = type(clip).encode_from_tokens

    def recording(self, tokens, **kwargs):
        seen.append(tokens)
        return original(self, tokens, **kwargs)

    monkeypatch.setattr(type(clip), "encode_from_tokens", recording)
    _api(comfy).encode_conditioning(clip, loaded["sdxl_adapter"], loaded["face"].features, "a photo", "")
    for tokens in seen:
        ids_l, ids_g = [i for i, _ in tokens["l"][0]], [i for i, _ in tokens["g"][0]]
        end = ids_l.index(49407) + 1
        assert ids_g[:end] == ids_l[:end] and set(ids_g[end:]) <= {0} and set(ids_l[end:]) <= {49407}


def test_clip_of_another_base_model_is_refused(comfy, loaded):
    from consistentid_core import ModelMismatch

    with pytest.raises(ModelMismatch, match="for SD1.5, but the CLIP is SDXL"):
        _api(comfy).encode_conditioning(loaded["sdxl_clip"], loaded["adapter"], loaded["face"].features, "a", "")


def test_unknown_region_name_is_refused(comfy, loaded):
    with pytest.raises(ValueError, match="unknown facial parts"):
        _api(comfy).encode_conditioning(loaded["clip"], loaded["adapter"], loaded["face"].features, "a", "", parts=["hair"])


def test_one_module_identity_for_the_core(comfy):
    """The package ComfyUI loaded and a script importing the core share the same classes."""
    import consistentid_core
    import consistentid_core.face_features

    nodes_package = comfy.package.nodes
    assert nodes_package.patch.ConsistentIDAdapter is consistentid_core.ConsistentIDAdapter
    assert nodes_package.conditioning.FaceFeatures is consistentid_core.face_features.FaceFeatures


def test_model_folders_are_registered_with_model_extensions(comfy):
    folder_paths = comfy.folder_paths
    (comfy.models_dir / "consistentid" / "readme.txt").write_text("not a model")
    for name in ("consistentid", "face_parsing"):
        paths, extensions = folder_paths.folder_names_and_paths[name]
        assert str(comfy.models_dir / name) in paths
        assert extensions == set(folder_paths.supported_pt_extensions)
    folder_paths.filename_list_cache.pop("consistentid", None)
    assert "readme.txt" not in folder_paths.get_filename_list("consistentid")
    assert "ConsistentID-v1.bin" in folder_paths.get_filename_list("consistentid")
    assert str(comfy.models_dir / "insightface") in folder_paths.get_folder_paths("insightface")


def test_registration_keeps_paths_from_extra_model_paths(comfy, tmp_path):
    """A folder extra_model_paths.yaml registered first stays, the default models/<name> is added."""
    folder_paths, folders = comfy.folder_paths, comfy.package.nodes.folders
    name = "consistentid_test_folder"
    folder_paths.add_model_folder_path(name, str(tmp_path))
    try:
        paths = folders.register_folder(name, {".bin"})
        assert paths == [str(tmp_path), str(comfy.models_dir / name)]
        assert folder_paths.folder_names_and_paths[name][1] == {".bin"}
    finally:
        folder_paths.folder_names_and_paths.pop(name, None)


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_adapter_runs_the_portrait(comfy, dtype):
    """The adapter's encoders in fp16/bf16 (CPU here) feed an fp32 UNet: finite result."""
    prompt = _portrait(**{ADAPTER: {"dtype": dtype}})
    result = comfy.runner.run(prompt)
    assert result.success, result.error
    assert torch.isfinite(_first(result, "21")["samples"]).all()
    assert str(_first(result, ADAPTER).dtype) == f"torch.{ {'fp16': 'float16', 'bf16': 'bfloat16'}[dtype] }"


def test_start_after_end_fails_validation(comfy):
    _, _, good_outputs, node_errors = comfy.runner.validate(_portrait(**{APPLY: {"start_at": 0.8, "end_at": 0.2}}))
    assert "23" not in good_outputs  # the image output depends on Apply
    assert "need 0 <= start_at <= end_at <= 1" in str(node_errors[APPLY])


def test_unconditional_clip_features_are_encoded_once_per_clip_model(comfy, loaded):
    """The all-zero CLIP input is served from a per-model cache, with the same numbers as encoding it."""
    runtime = comfy.package.nodes.runtime
    clip_vision = loaded["clip_vision"]
    encode = runtime.clip_vision_hidden_states(clip_vision)
    pixels = torch.randn(3, 3, 224, 224)
    pixels[1] = 0
    calls = []
    original_forward = clip_vision.model.forward

    def counting_forward(*args, **kwargs):
        calls.append(kwargs["pixel_values"].shape[0])
        return original_forward(*args, **kwargs)

    clip_vision.__dict__.pop(runtime.UNCOND_ATTRIBUTE, None)
    clip_vision.model.forward = counting_forward
    try:
        with torch.inference_mode():  # as the executor runs nodes
            first = encode(pixels)
            second = encode(pixels)
    finally:
        del clip_vision.model.forward
    assert calls == [1, 2, 2]  # zero image once, then only the two real images, twice
    assert torch.equal(first, second)
    with torch.inference_mode():
        direct = clip_vision.model(pixel_values=pixels[1:2], intermediate_output=-2)[1].float()
    assert torch.allclose(first[1], direct[0], atol=1e-5)


def test_damaged_parser_file_gives_one_sentence_without_unsafe_advice(comfy):
    """Random bytes as face_parsing.pth: one short sentence (not PyTorch's 989-character weights-only text)."""
    import numpy as np

    (comfy.models_dir / "face_parsing" / "damaged.pth").write_bytes(np.random.default_rng(0).bytes(4096))
    comfy.folder_paths.filename_list_cache.pop("face_parsing", None)
    try:
        message = _error_message(comfy.runner.run(_portrait(**{PARSER: {"parser_name": "damaged.pth"}})))
    finally:
        (comfy.models_dir / "face_parsing" / "damaged.pth").unlink()
        comfy.folder_paths.filename_list_cache.pop("face_parsing", None)
    assert message.startswith("Load Face Parser (Unreadable model file): damaged.pth is not a usable face parser")
    assert "download face_parsing.pth again" in message and len(message) < 300
    assert "weights_only" not in message and "False" not in message
