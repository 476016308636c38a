"""The licence is stated once and the same everywhere: LICENSE, pyproject.toml, README."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_licence_file_pyproject_and_readme_agree():
    licence = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert licence.split()[:6] == ["GNU", "GENERAL", "PUBLIC", "LICENSE", "Version", "3,"]
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == {"text": "GPL-3.0-or-later"}
    assert "License :: OSI Approved :: GNU General Public License v3 or later (GPLv3+)" in project["classifiers"]
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## License"):]
    assert section.splitlines()[2].startswith("GPL-3.0-or-later")
    assert "MIT-licensed, Copyright (c) 2024 Jiehui Huang" in section
