"""Inference and export of a trained adapter, one module per job; each imports only those listed above it:

sources     where an adapter comes from (a folder or an MLflow run), its training settings, base + adapter loaded
assistant   answers through the safety layer: triage, generation (streamed or batched), output checks, audit
export      the adapter merged into its base weights as a standalone checkpoint, and/or logged to MLflow
session     one `infer.py` session: the config checks, then export and/or one prompt, a prompt file or a chat

Nothing is re-exported here, so importing one module loads only what it needs.
"""
