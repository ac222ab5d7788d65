"""The system prompt computed once per optimizer step instead of once per packed row.

Every conversation of this project begins with the same safety system prompt. Packed rows
already lay it once per row (medlora.batching.collate_packed); an optimizer step of several rows
still computed it once per row. Here the tokens that every conversation of the step begins with
before its first label run through the decoder once, their keys and values at each layer are
kept, and the step's rows leave them out: each conversation attends to them as if they stood
before it (medlora.fast.attention.sdpa_varlen). The gradients the rows send to those keys and
values are summed over the step and go back through the prefix's forward pass once, before the
optimizer step: the same gradient as computing the prefix in every row, except that the
prefix's LoRA dropout mask is drawn once per step.
"""

from __future__ import annotations

import torch

from medlora.batching import prefix_room


class StepPrefix:
    """Keys and values of a step's shared prefix, per layer: made once, read by every row of the step.

    The prefix's forward pass hands its keys and values to `record`; `freeze` detaches them into
    leaves that the rows' attention reads (`get`) and that collect the rows' gradients, and
    `backward` sends those gradients through the prefix's forward pass.
    """

    def __init__(self, length: int):
        self.length = length
        self.made: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.leaves: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def record(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        # gradient checkpointing runs the prefix's layers again in its backward pass: keep the first
        if not self.leaves and layer not in self.made:
            self.made[layer] = (key, value)

    def freeze(self) -> None:
        self.leaves = {
            layer: tuple(t.detach().requires_grad_(t.requires_grad) for t in pair) for layer, pair in self.made.items()
        }

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.leaves[layer]

    def backward(self) -> None:
        """The rows' gradients with respect to the prefix's keys and values, through its forward pass."""
        pairs = [
            (made, leaf.grad)
            for layer in self.made
            for made, leaf in zip(self.made[layer], self.leaves[layer])
            if leaf.grad is not None
        ]
        if pairs:
            torch.autograd.backward([made for made, _ in pairs], [grad for _, grad in pairs])
        self.made, self.leaves = {}, {}


def common_prefix(window: list[dict]) -> int:
    """How many leading tokens every conversation of these packed rows has, before any has a label.

    A row's later conversations hold only the first `shared_prefix` tokens of the row in common
    with its first one; a row of one conversation can give what medlora.batching.prefix_room allows.
    """
    if any("cu_seq_lens_q" not in row for row in window):
        return 0
    length = min(_row_bound(row) for row in window)
    first = window[0]["input_ids"][0]
    for row in window[1:]:
        differ = (row["input_ids"][0, :length] != first[:length]).nonzero()
        length = int(differ[0]) if len(differ) else length
    return max(length, 0)


def _row_bound(row: dict) -> int:
    if len(row["cu_seq_lens_q"]) > 2:
        return row.get("shared_prefix", 0)
    return prefix_room(row["labels"][0].tolist())


def without_prefix(row: dict, prefix: StepPrefix) -> dict:
    """A packed row with the step's prefix left out: its conversations read it from `prefix`.

    The tokens left out have no label and predict none (common_prefix stops before), so the
    row's supervised tokens are the same.
    """
    n = prefix.length
    bounds = row["cu_seq_lens_q"] - n
    bounds[0] = 0
    longest = int((bounds[1:] - bounds[:-1]).max())
    out = {
        **row,
        "input_ids": row["input_ids"][:, n:],
        "position_ids": row["position_ids"][:, n:],
        "labels": row["labels"][:, n:],
        "cu_seq_lens_q": bounds,
        "cu_seq_lens_k": bounds,
        "max_length_q": longest,
        "max_length_k": longest,
        "step_prefix": prefix,
    }
    out.pop("shared_prefix", None)
    if row.get("shared_prefix", 0) > n:
        out["shared_prefix"] = row["shared_prefix"] - n
    return out


def run_prefix(model, window: list[dict]) -> tuple[StepPrefix | None, list[dict]]:
    """Run the window's common prefix through the decoder once; return it and the rows without it.

    (None, window) when the rows share nothing or hold a single conversation between them.
    """
    length = common_prefix(window)
    conversations = sum(len(row["cu_seq_lens_q"]) - 1 for row in window) if length else 0
    if conversations < 2:
        return None, window
    prefix = StepPrefix(length)
    first = window[0]
    bounds = torch.tensor([0, length], dtype=first["cu_seq_lens_q"].dtype, device=first["input_ids"].device)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # its last hidden states feed no loss (the prefix has no labels): only the keys and values count
    base.get_decoder()(
        input_ids=first["input_ids"][:, :length],
        position_ids=first["position_ids"][:, :length],
        cu_seq_lens_q=bounds,
        cu_seq_lens_k=bounds,
        max_length_q=length,
        max_length_k=length,
        record_prefix=prefix,
    )
    prefix.freeze()
    return prefix, [without_prefix(row, prefix) for row in window]
