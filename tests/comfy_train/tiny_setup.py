"""Setup hook for trainer subprocesses on the tiny test models (``model.setup_hooks``).

ComfyUI only detects full-size architectures; the integration tests register tiny configs with the
real SD1.5/SDXL topology (``tests/comfy/cid_tiny_models.py``). A ``train.fit`` subprocess does the
same through this hook: ``setup_hooks: ["tests/comfy_train/tiny_setup.py:register"]``.
"""

from __future__ import annotations

import sys
from pathlib import Path

HARNESS = Path(__file__).resolve().parents[1] / "comfy"


def register(model_config) -> None:
    if str(HARNESS) not in sys.path:
        sys.path.append(str(HARNESS))
    import cid_tiny_models

    cid_tiny_models.register_tiny_architectures(Path(model_config.clip_vision_config))
