"""Integration tests against a real ComfyUI checkout (COMFYUI_PATH or ComfyUI/custom_nodes layout).

Without one every test here is skipped with the reason. With one, ComfyUI's root is put at
``sys.path[0]`` as soon as this file is imported, before anything can import ``nodes`` (our
``nodes/`` folder must never shadow ComfyUI's ``nodes.py``); ComfyUI itself is imported by the
session fixture with ``--cpu`` and a temporary ``--base-directory`` holding tiny models.
"""

from __future__ import annotations

import sys

import pytest

from tests.fixtures import cid_harness

COMFYUI_ROOT, SKIP_REASON = cid_harness.find_comfyui()
if COMFYUI_ROOT is not None:
    import tests.fixtures.tiny_adapter  # noqa: F401  (our `tests` package first: ComfyUI has one too)

    if sys.path[0] != str(COMFYUI_ROOT):
        sys.path.insert(0, str(COMFYUI_ROOT))


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI with our package loaded and a models tree of tiny models in the real formats."""
    if COMFYUI_ROOT is None:
        pytest.skip(SKIP_REASON)
    base = tmp_path_factory.mktemp("comfyui_base")
    env = cid_harness.import_comfyui(COMFYUI_ROOT, base)

    from tests.fixtures import cid_tiny_models
    from tests.fixtures.insightface_tiny import make_tiny_insightface_pack
    from tests.fixtures.tiny_adapter import make_tiny_adapter

    adapters = {"sd15": make_tiny_adapter("sd15", seed=1), "sdxl": make_tiny_adapter("sdxl", seed=2)}
    env.models_dir = base / "models"
    env.paths = cid_tiny_models.build_models_tree(env.models_dir, adapters)
    make_tiny_insightface_pack(env.models_dir / "insightface")
    env.images = cid_tiny_models.write_images(base / "input")
    env.tiny = cid_tiny_models
    env.package = cid_harness.load_package(env.nodes)
    env.runner = cid_harness.PromptRunner(env.execution)
    return env


@pytest.fixture()
def runner(comfy):
    return comfy.runner
