"""The optimiser of a run and its learning-rate schedule (warmup, Noam or cosine decay, cooldown, re-warmup)."""

from __future__ import annotations

import math

import torch
from torch import nn

from streamer.training.pretrain_recipe import PretrainRecipe
from streamer.training.recipe import Recipe
from streamer.training.rundir import Progress


def build_optimizer(model: nn.Module, recipe: Recipe | PretrainRecipe) -> torch.optim.AdamW:
    """AdamW; no weight decay on biases, norms and the attention position biases."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (decay if param.ndim >= 2 and "pos_bias" not in name else no_decay).append(param)
    opt = recipe.optim
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": opt.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=opt.lr,
        betas=(opt.betas[0], opt.betas[1]),
        eps=opt.eps,
    )


def learning_rate(recipe: Recipe | PretrainRecipe, step: int) -> float:
    """Linear warmup to ``lr``, then Noam (inverse square root) or cosine decay to ``min_lr``.

    With ``optim.anneal_steps``, the last that many steps before ``train.max_steps`` take the rate
    linearly from the schedule's value down to ``min_lr`` (a cooldown, which a run can add at its end).
    ``step`` counts optimizer steps from 0.
    """
    opt = recipe.optim
    s = step + 1
    if s <= opt.warmup_steps:
        return opt.lr * s / max(opt.warmup_steps, 1)
    if opt.schedule == "noam":
        lr = max(opt.min_lr, opt.lr * math.sqrt(opt.warmup_steps / s))
    else:
        span = max(recipe.train.max_steps - opt.warmup_steps, 1)
        progress = min(1.0, (s - opt.warmup_steps) / span)
        lr = opt.min_lr + 0.5 * (opt.lr - opt.min_lr) * (1 + math.cos(math.pi * progress))
    left = recipe.train.max_steps - step  # steps still to take, this one included
    if 0 < opt.anneal_steps and left <= opt.anneal_steps:
        lr = opt.min_lr + (lr - opt.min_lr) * max(left - 1, 0) / opt.anneal_steps
    return lr


def scheduled_lr(recipe: Recipe, progress: Progress) -> float:
    """The learning rate of the next step: the schedule, ramped up again after a warm start.

    A warm start brings weights but not the optimizer's moment estimates, so the first
    ``optim.rewarmup_steps`` steps scale the scheduled rate linearly from 0 while Adam re-learns them.
    """
    lr = learning_rate(recipe, progress.step)
    if progress.warm_start_step >= 0 and recipe.optim.rewarmup_steps > 0:
        done = progress.step - progress.warm_start_step + 1
        lr *= min(1.0, done / recipe.optim.rewarmup_steps)
    return lr
