"""Safety layer: PHI redaction and content filtering of training data (and triage, beside them)."""
