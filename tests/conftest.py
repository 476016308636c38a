"""Integration tests against a real ComfyUI checkout (COMFYUI_PATH or ComfyUI/custom_nodes layout).

With ``COMFYUI_PATH`` unset the tests that need ComfyUI are skipped with the reason; set to something
that is not ComfyUI, the run fails. ComfyUI is started once per session by
``consistentid_cli.comfy_boot`` with ``--cpu`` and a temporary ``--base-directory`` holding tiny
models in the release formats (``consistentid_cli.selftest.tiny_comfy_models``). Our ``tests``
package is imported here, before ComfyUI's root goes first on ``sys.path`` (ComfyUI has one too).
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from tests.fixtures import cid_harness

COMFYUI_ROOT, SKIP_REASON = cid_harness.comfyui_for_tests()


@pytest.fixture(scope="session")
def comfy(tmp_path_factory):
    """ComfyUI with our package loaded and a models tree of tiny models in the real formats."""
    if COMFYUI_ROOT is None:
        pytest.skip(SKIP_REASON)
    from consistentid_cli.comfy_boot import HeadlessExecutor, boot_comfyui

    base = tmp_path_factory.mktemp("comfyui_base")
    handle = boot_comfyui(COMFYUI_ROOT, ["--cpu", "--base-directory", str(base)], load_package=False)
    if Path(handle.folder_paths.base_path) != base:
        raise RuntimeError(f"ComfyUI was imported before the tests set --base-directory ({handle.folder_paths.base_path})")
    from consistentid_cli.selftest import tiny_comfy_models

    paths, images = tiny_comfy_models.build_install(base)
    handle = boot_comfyui(COMFYUI_ROOT)  # now loads our package
    return SimpleNamespace(
        root=handle.root, nodes=handle.nodes, execution=handle.execution, folder_paths=handle.folder_paths,
        model_management=handle.model_management, package=handle.package, models_dir=base / "models",
        paths=paths, images=images, tiny=tiny_comfy_models, runner=HeadlessExecutor(handle),
    )


@pytest.fixture()
def runner(comfy):
    return comfy.runner
