"""Where a ComfyUI install keeps things, found without importing ComfyUI.

Mirrors ``folder_paths`` (models under ``<base>/models``, ``--base-directory`` moves the base) and
``utils/extra_config.py`` (``extra_model_paths.yaml``: sections with an optional ``base_path``,
then ``folder_name: path`` entries, several paths separated by newlines).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "MINIMUM_COMFYUI",
    "ComfyLayout",
    "default_comfyui_path",
    "parse_version",
    "read_comfyui_version",
]

#: Oldest ComfyUI the nodes support: V3 node API (0.3.47) with core nodes converted to it (0.3.60).
MINIMUM_COMFYUI = (0, 3, 60)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_VERSION_LINE = re.compile(r"""^__version__\s*=\s*["']([^"']+)["']""", re.MULTILINE)


def parse_version(text: str) -> tuple[int, ...]:
    """``"0.3.64"`` → ``(0, 3, 64)``; trailing non-numeric parts (``rc1``) are ignored."""
    numbers = []
    for part in text.strip().split("."):
        digits = re.match(r"\d+", part)
        if not digits:
            break
        numbers.append(int(digits.group()))
    return tuple(numbers)


def read_comfyui_version(root: str | Path) -> str | None:
    """The version string in ``comfyui_version.py`` (read as text: ComfyUI is not imported)."""
    try:
        text = (Path(root) / "comfyui_version.py").read_text(encoding="utf-8")
    except OSError:
        return None
    match = _VERSION_LINE.search(text)
    return match.group(1) if match else None


def default_comfyui_path() -> Path | None:
    """``$COMFYUI_PATH``, else the ComfyUI this package is installed in (``custom_nodes/<us>``)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        return Path(env).expanduser()
    if PACKAGE_ROOT.parent.name == "custom_nodes":
        return PACKAGE_ROOT.parent.parent
    return None


@dataclass
class ComfyLayout:
    """A ComfyUI install: its code root, the base folder and the registered model folders."""

    root: Path
    base: Path
    extra: dict[str, list[Path]] = field(default_factory=dict)
    yaml_files: list[Path] = field(default_factory=list)
    yaml_errors: list[str] = field(default_factory=list)

    @classmethod
    def discover(
        cls, root: str | Path, base_directory: str | Path | None = None, extra_configs: tuple[str | Path, ...] = ()
    ) -> ComfyLayout:
        root = Path(root).expanduser().resolve()
        base = Path(base_directory).expanduser().resolve() if base_directory else root
        layout = cls(root=root, base=base)
        candidates = [root / "extra_model_paths.yaml", *(Path(p).expanduser() for p in extra_configs)]
        for path in candidates:
            if path.is_file():
                layout._read_extra_config(path)
        return layout

    @property
    def models_dir(self) -> Path:
        return self.base / "models"

    @property
    def version(self) -> str | None:
        return read_comfyui_version(self.root)

    def folders(self, name: str) -> list[Path]:
        """The default ``models/<name>`` followed by extra_model_paths.yaml entries for ``name``."""
        default = [self.models_dir / name]
        return default + [p for p in self.extra.get(name, []) if p not in default]

    def _read_extra_config(self, path: Path) -> None:
        try:
            import yaml
        except ImportError:
            self.yaml_errors.append(f"{path}: PyYAML is not installed, so it was not read")
            return
        try:
            config = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as error:
            self.yaml_errors.append(f"{path}: not readable YAML ({error})")
            return
        self.yaml_files.append(path)
        for section in config.values() if isinstance(config, dict) else ():
            if not isinstance(section, dict):
                continue
            section = dict(section)
            base_path = section.pop("base_path", None)
            section.pop("is_default", None)
            if base_path:
                base_path = Path(os.path.expandvars(os.path.expanduser(str(base_path))))
                if not base_path.is_absolute():
                    base_path = path.parent / base_path
            for name, value in section.items():
                for line in str(value).split("\n"):
                    if not line.strip():
                        continue
                    entry = Path(line.strip())
                    full = (base_path / entry) if base_path else entry if entry.is_absolute() else path.parent / entry
                    self.extra.setdefault(str(name), []).append(Path(os.path.normpath(full)))
