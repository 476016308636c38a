"""Fixtures of the node tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def api(comfy):
    """``nodes/patch.py`` as ComfyUI loaded it (patch_model, merge_lora)."""
    return comfy.package.nodes.patch
