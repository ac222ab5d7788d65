"""LoraRecipe in process on the tiny model: the optimizer and scheduler come from config, one step
is the update its optimizer makes from the loss's gradient, and main's return value is the metric
optimized_metric names."""

from __future__ import annotations

import pytest
import torch

from medlora.cli import RunInfo
from medlora.config import MedloraError
from medlora.train import LoraRecipe

from helpers import EXACT, TINY

LR = 0.5
# exact maths (helpers.EXACT) and no clipping: one SGD step is exactly theta - LR * gradient
SGD_STEP = [
    *TINY,
    *EXACT,
    "tracking=none",
    "training.max_grad_norm=0",
    "training.max_steps=1",
    "training.batch_size=2",
    "training.packing=false",
    "data.max_train_samples=4",
    "data.max_eval_samples=2",
    f"training.learning_rate={LR}",
    "training.optimizer._target_=torch.optim.SGD",
]


@pytest.fixture
def recipe(cfg_train, tmp_path):
    """A set-up recipe on SGD_STEP plus the test's overrides."""

    def make(*overrides: str) -> LoraRecipe:
        made = LoraRecipe(cfg_train(*SGD_STEP, *overrides), RunInfo(output_dir=tmp_path))
        made.setup()
        return made

    return make


def _token_mean_loss(model, batch: dict) -> torch.Tensor:
    """Cross-entropy of each next token that has a label, averaged over those tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100
    )


def test_one_sgd_step_is_theta_minus_lr_times_the_gradient(recipe):
    recipe = recipe()
    assert type(recipe.optimizer.optimizer) is torch.optim.SGD
    model = recipe.accelerator.unwrap_model(recipe.model)
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with torch.no_grad():  # a non-zero B, so that A has a gradient too
        for name, p in trainable.items():
            if "lora_B" in name:
                p.normal_(std=0.1)
    # the recipe's first micro-batch: train() puts the sampler back to the start of the epoch
    batch = next(iter(recipe.train_loader))
    _token_mean_loss(model, batch).backward()
    before = {n: p.detach().clone() for n, p in trainable.items()}
    expected = {n: (p - LR * p.grad).detach() for n, p in trainable.items()}
    model.zero_grad()

    recipe.train()
    for name, p in trainable.items():
        torch.testing.assert_close(p.detach(), expected[name], atol=1e-6, rtol=1e-5)
    assert all(not torch.equal(p.detach(), before[n]) for n, p in trainable.items())  # every weight moved


def test_the_optimizer_block_passes_its_arguments(recipe):
    recipe = recipe("+training.optimizer.momentum=0.9", "+training.optimizer.nesterov=true")
    (group,) = recipe.optimizer.param_groups
    assert (group["lr"], group["momentum"], group["nesterov"]) == (LR, 0.9, True)


def test_the_scheduler_block_sets_the_schedule(recipe):
    recipe = recipe("training.lr_scheduler=linear", "training.max_steps=4", "training.warmup_ratio=0.5")
    rates = []
    for _ in range(4):
        recipe.optimizer.step()
        recipe.scheduler.step()
        rates.append(recipe.scheduler.get_last_lr()[0])
    # two warm-up steps to LR, then a straight line to zero at step 4
    assert rates == pytest.approx([LR / 2, LR, LR / 2, 0.0])


def test_optimized_metric_is_the_final_metric_it_names(recipe):
    recipe = recipe("optimized_metric=eval_perplexity")
    recipe.evaluate("before")
    recipe.train()
    after = recipe.evaluate("after")
    assert recipe.optimized_metric() == after["eval_perplexity"]
    recipe.cfg.optimized_metric = "train_loss"  # logged per step, not a final metric
    with pytest.raises(MedloraError, match="optimized_metric=train_loss was not measured by this run"):
        recipe.optimized_metric()
