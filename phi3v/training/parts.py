"""The parts of the model that the freezing flags and the per-part learning rates act on, and the table of what
trains that every run logs at start.

Three parts, by the official parameter names (PEFT prefixes them with "base_model.model."):
- ``vision``: CLIP, ``model.vision_embed_tokens.img_processor`` (--freeze_clip, --vision_lr);
- ``projector``: the rest of ``model.vision_embed_tokens``, the projector ``img_projection`` and the
  separators ``glb_GN``/``sub_GN`` (--freeze_projector, --projector_lr);
- ``language``: everything else: token embeddings, decoder layers, final norm, lm_head (--freeze_language_model).
A LoRA adapter belongs to the part of the layer it adapts.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable

import torch

from ..args import RecipeArguments
from ..errors import RecipeError

VISION, PROJECTOR, LANGUAGE = "vision", "projector", "language"
PARTS = (VISION, PROJECTOR, LANGUAGE)

# Finer groups for the table, by parameter-name prefix (first match wins), with the part each belongs to.
PARAMETER_GROUPS = (
    ("vision tower (CLIP)", "model.vision_embed_tokens.img_processor.", VISION),
    ("projector", "model.vision_embed_tokens.img_projection.", PROJECTOR),
    ("separators (glb_GN, sub_GN)", "model.vision_embed_tokens.", PROJECTOR),
    ("token embeddings", "model.embed_tokens.", LANGUAGE),
    ("decoder layers", "model.layers.", LANGUAGE),
    ("final norm", "model.norm.", LANGUAGE),
    ("lm_head", "lm_head", LANGUAGE),
)


def _matching_group(name: str) -> tuple[str, str, str] | None:
    bare = name.removeprefix("base_model.model.")
    return next((group for group in PARAMETER_GROUPS if bare.startswith(group[1])), None)


def part_of(name: str) -> str:
    """The part (vision, projector or language) of a parameter or module, by its name."""
    group = _matching_group(name)
    return group[2] if group is not None else LANGUAGE


def parameter_group(name: str) -> str:
    group = _matching_group(name)
    label = group[0] if group is not None else "other"
    return f"LoRA adapters on {label}" if ".lora_" in name else label


def frozen_parts(args: RecipeArguments) -> set[str]:
    """The parts the flags freeze (--freeze_vision_model is --freeze_clip with --freeze_projector)."""
    chosen = {VISION: args.freeze_clip, PROJECTOR: args.freeze_projector, LANGUAGE: args.freeze_language_model}
    return {part for part, frozen in chosen.items() if frozen}


def learning_rates(args: RecipeArguments) -> dict[str, float]:
    """The peak learning rate of each part: --vision_lr, --projector_lr, else --learning_rate."""
    return {
        VISION: args.vision_lr if args.vision_lr is not None else args.learning_rate,
        PROJECTOR: args.projector_lr if args.projector_lr is not None else args.learning_rate,
        LANGUAGE: args.learning_rate,
    }


def optimizer_groups(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    decay_names: Iterable[str],
    weight_decay: float,
    rates: dict[str, float],
) -> list[dict]:
    """The trainable parameters in one optimizer group per (part, weight decay or none), each with its part's
    learning rate, in the order of the model's parameters; empty groups are left out."""
    decay_names = set(decay_names)
    groups: dict[tuple[str, bool], list[torch.nn.Parameter]] = {}
    for name, parameter in named_parameters:
        if parameter.requires_grad:
            groups.setdefault((part_of(name), name in decay_names), []).append(parameter)
    return [
        {"params": params, "weight_decay": weight_decay if decays else 0.0, "lr": rates[part], "part": part}
        for (part, decays), params in groups.items()
    ]


def trainable_parameter_table(model: torch.nn.Module, rates: dict[str, float] | None = None) -> str:
    """One line per group: trainable and total parameters (and the learning rate of the trainable ones, given
    ``rates`` per part). Raises when nothing trains."""
    trainable: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    part: dict[str, str] = {}
    for name, parameter in model.named_parameters():
        group = parameter_group(name)
        total[group] += parameter.numel()
        trainable[group] += parameter.numel() if parameter.requires_grad else 0
        part[group] = part_of(name)
    if not any(trainable.values()):
        raise RecipeError(
            "No parameter of the model is trainable, so training would change nothing. Check the freezing and "
            "LoRA flags (--freeze_vision_model with --use_lora and no vision targets, for example)."
        )
    rate_column = f"{'learning rate':>16}" if rates else ""
    lines = [f"{'group':<40}{'trainable':>16}{'total':>16}{rate_column}"]
    for group in sorted(total, key=_group_order):
        rate = f"{rates[part[group]]:>16.3g}" if rates and trainable[group] else ""
        lines.append(f"{group:<40}{trainable[group]:>16,}{total[group]:>16,}{rate}")
    lines.append(f"{'all':<40}{sum(trainable.values()):>16,}{sum(total.values()):>16,}")
    return "\n".join(lines)


def _group_order(group: str) -> tuple[int, bool]:
    base = group.removeprefix("LoRA adapters on ")
    labels = [label for label, _, _ in PARAMETER_GROUPS]
    return (labels.index(base) if base in labels else len(labels), group != base)
