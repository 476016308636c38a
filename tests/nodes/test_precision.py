"""Reduced precision end to end: the SD1.5 and SDXL example graphs with the UNet and the text
encoders in fp16 and in bf16, the adapter on ``auto``, against the fp32 run of the same graph.

Two ways of running reduced precision on this CPU:

* ``flags``: ComfyUI's ``--fp16-unet --fp16-text-enc`` (``--bf16-…``) exactly as a user passes
  them. On a CPU ComfyUI then stores the UNet in fp16/bf16 but computes in fp32 (manual cast),
  while the text encoders compute in their own dtype;
* ``native``: the same flags, and the UNet also *computes* in its storage dtype, as on a CUDA GPU
  (``unet_manual_cast`` answers "no cast", what it answers for fp16/bf16 on CUDA). Our attention
  patch then gets fp16/bf16 ``q``/``k``/``v`` as it does on users' GPUs, and the adapter runs in
  the reduced dtype too.

The sampled latents must be finite and close to the fp32 run: relative L2 distance below
:data:`TOLERANCE` (measured values are in docs/FIDELITY.md). The flags are global arguments read
when a model is loaded, so each precision gets a fresh executor (empty cache) to load the models
again with them.
"""

from __future__ import annotations

import pytest
import torch

from consistentid_cli.comfy_boot import HeadlessExecutor
from tests.fixtures import cid_workflows as wf

# Relative L2 distance of the sampled latents to the fp32 run; measured at most 4.8e-3 (fp16) and
# 4.0e-2 (bf16) on CPU, table in docs/FIDELITY.md.
TOLERANCE = {"fp16": 0.02, "bf16": 0.1}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}
GRAPHS = ("sd15_portrait", "sdxl_portrait")
LATENT_PX = 64  # 8x8 latents, 3 steps (cid_workflows.TEST_STEPS): every layer and dtype path, quickly


def _sample(comfy, name: str, adapter_dtype: str = "auto") -> tuple[torch.Tensor, dict]:
    prompt = wf.at_test_size(wf.load_api(name))
    for node in prompt.values():
        if node["class_type"] == "ConsistentID_ModelLoader":
            node["inputs"]["dtype"] = adapter_dtype
        if node["class_type"] == "EmptyLatentImage":
            node["inputs"]["width"] = node["inputs"]["height"] = LATENT_PX
    sampler = wf.nodes_of(prompt, "KSampler")[0]
    apply = wf.nodes_of(prompt, "ConsistentID_Apply")[0]
    runner = HeadlessExecutor(comfy)  # empty cache: models load again with the flags
    result = runner.run(prompt)
    assert result.success, result.error
    model = result.output(apply)[0][0]
    facts = {"unet_dtype": model.model.get_dtype(), "compute_dtype": model.model.manual_cast_dtype}
    return result.output(sampler)[0][0]["samples"].float(), facts


@pytest.fixture(scope="module")
def fp32_latents(comfy):
    from comfy.cli_args import args

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(args, "fp32_unet", True)
        patch.setattr(args, "fp32_text_enc", True)
        return {name: _sample(comfy, name)[0] for name in GRAPHS}


def _reduced(monkeypatch, comfy, precision: str, native: bool) -> None:
    from comfy.cli_args import args

    monkeypatch.setattr(args, f"{precision}_unet", True)
    monkeypatch.setattr(args, f"{precision}_text_enc", True)
    if native:
        original = comfy.model_management.unet_manual_cast

        def no_cast(weight_dtype, inference_device, *rest, **kwargs):
            if weight_dtype == DTYPES[precision]:
                return None  # what a CUDA GPU with fp16/bf16 compute gets
            return original(weight_dtype, inference_device, *rest, **kwargs)

        monkeypatch.setattr(comfy.model_management, "unet_manual_cast", no_cast)


def relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value - reference).norm() / reference.norm())


@pytest.mark.parametrize("native", [False, True], ids=["flags", "native"])
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
@pytest.mark.parametrize("name", GRAPHS)
def test_reduced_precision_graph_stays_close_to_fp32(comfy, fp32_latents, monkeypatch, name, precision, native):
    _reduced(monkeypatch, comfy, precision, native)
    adapter_dtype = precision if native else "auto"  # native: the adapter in the GPU's dtype, as auto picks there
    latents, facts = _sample(comfy, name, adapter_dtype)
    assert facts["unet_dtype"] == DTYPES[precision]
    assert facts["compute_dtype"] == (None if native else torch.float32)
    assert torch.isfinite(latents).all()
    distance = relative_l2(latents, fp32_latents[name])
    print(f"\n{name} {precision} {'native' if native else 'flags'}: relative L2 {distance:.2e}")
    assert distance < TOLERANCE[precision], distance
