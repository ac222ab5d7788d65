"""Training data passes the safety layer before tokenization: PHI redaction, then content filtering."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

from omegaconf import DictConfig, OmegaConf

from medlora.files import sha256_text
from medlora.safety.content import filter_conversations
from medlora.safety.phi import PhiRedactor


@dataclass
class CleanReport:
    """Counts only: no text of the conversations ever leaves this function."""

    conversations_in: int = 0
    conversations_out: int = 0
    phi: Counter = field(default_factory=Counter)
    conversations_redacted: int = 0
    content: Counter = field(default_factory=Counter)
    flagged: list[int] = field(default_factory=list)
    # placeholder | surrogate, and the SHA-256 of the surrogate seed (the seed itself and the mapping are never kept)
    phi_mode: str = "placeholder"
    surrogate_seed_sha256: str | None = None

    def metrics(self, prefix: str) -> dict[str, int]:
        found = {f"{prefix}_phi_{name.lower()}": n for name, n in self.phi.items()}
        found.update({f"{prefix}_{rule.replace('.', '_')}": n for rule, n in self.content.items()})
        found[f"{prefix}_phi_redactions"] = sum(self.phi.values())
        found[f"{prefix}_conversations_redacted"] = self.conversations_redacted
        found[f"{prefix}_content_removed"] = self.conversations_in - self.conversations_out
        found[f"{prefix}_content_flagged"] = len(self.flagged)
        return found


def clean_conversations(conversations: list[list[dict]], safety: DictConfig) -> tuple[list, CleanReport]:
    report = CleanReport(conversations_in=len(conversations))
    if safety.phi_redaction.enabled:
        settings = OmegaConf.to_container(safety.phi_redaction, resolve=True)
        del settings["enabled"]
        redactor = PhiRedactor.from_config(settings)
        report.phi_mode = redactor.mode
        if redactor.mode == "surrogate":
            report.surrogate_seed_sha256 = sha256_text(str(redactor.seed))
        redacted = []
        for clean, counts in redactor.redact_conversations(conversations):
            report.phi.update(counts)
            report.conversations_redacted += bool(counts)
            redacted.append(clean)
        conversations = redacted
    if safety.content_filter.enabled:
        conversations, report.content, report.flagged = filter_conversations(
            conversations, safety.content_filter.action, workers=os.cpu_count() or 1
        )
    report.conversations_out = len(conversations)
    return conversations, report
