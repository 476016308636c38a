"""Findings of the doctor and how they are printed.

Every finding says what was checked, what was found and, when something is wrong, exactly what to
do about it. Only ``FAIL`` findings block generation and make the exit code non-zero.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Level", "Finding", "Report"]


class Level(enum.IntEnum):
    OK = 0
    INFO = 1
    WARN = 2  # works, but slower or fragile
    FAIL = 3  # blocks generation

    @property
    def tag(self) -> str:
        # ASCII only: Windows consoles in legacy code pages cannot print check marks.
        return {Level.OK: "ok", Level.INFO: "info", Level.WARN: "WARN", Level.FAIL: "FAIL"}[self]


@dataclass
class Finding:
    """One result: ``fix`` lines are the steps that make a WARN/FAIL go away."""

    level: Level
    message: str
    fix: list[str] = field(default_factory=list)
    code: str = ""  # stable identifier for tests and scripts, e.g. "insightface.nested"


@dataclass
class Report:
    sections: dict[str, list[Finding]] = field(default_factory=dict)

    def add(self, section: str, finding: Finding) -> Finding:
        self.sections.setdefault(section, []).append(finding)
        return finding

    def extend(self, section: str, findings: list[Finding]) -> None:
        for finding in findings:
            self.add(section, finding)

    @property
    def findings(self) -> list[Finding]:
        return [finding for findings in self.sections.values() for finding in findings]

    def count(self, level: Level) -> int:
        return sum(finding.level == level for finding in self.findings)

    @property
    def exit_code(self) -> int:
        return 1 if self.count(Level.FAIL) else 0

    def codes(self, level: Level | None = None) -> list[str]:
        return [f.code for f in self.findings if level is None or f.level == level]

    def render(self, header: str = "") -> str:
        lines = [header, ""] if header else []
        for section, findings in self.sections.items():
            lines.append(section)
            for finding in findings:
                first, *rest = finding.message.splitlines() or [""]
                lines.append(f"  [{finding.level.tag:>4}] {first}")
                lines.extend(f"         {line}" for line in rest)
                for step in finding.fix:
                    lines.append(f"         fix: {step}")
            lines.append("")
        lines.append(self.summary())
        return "\n".join(lines)

    def summary(self) -> str:
        fails, warns = self.count(Level.FAIL), self.count(Level.WARN)
        if fails:
            verdict = f"{fails} problem(s) block generation"
        else:
            verdict = "nothing blocks generation"
        warn_text = f", {warns} warning(s)" if warns else ""
        return f"Summary: {verdict}{warn_text}. Exit code {self.exit_code}."
