"""Checkpoint selection by a held-out passkey score: the recipe's ``selection`` section.

A short fine-tuning run's last step is one draw from a noisy trajectory. Every ``passkey_every`` steps the callback
scores greedy passkey retrieval with full attention at the target length on samples drawn with ``passkey_seed``
(keep it apart from the seed of the final evaluation), and keeps a copy of the trainable weights that scored best.
When training ends the best copy is put back, so the adapter the run saves is the selected one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers import TrainerCallback

from ..settings import setting, validate_settings
from .passkey import passkey_accuracy

__all__ = ["BestWeightsCallback", "SelectionSection", "passkey_selection"]


@dataclass
class SelectionSection:
    """The recipe's ``selection`` section; off unless ``passkey_every`` is set."""

    passkey_every: int | None = setting(
        None, "Score held-out passkey retrieval every this many steps and keep the best weights; null: off.",
        "positive int or None",
    )
    passkey_trials: int = setting(64, "Held-out passkey samples per score.", "positive int")
    passkey_seed: int = setting(4321, "Seed of the held-out samples (not the final evaluation's).", "int")
    passkey_length: int | None = setting(
        None, "Length of the held-out samples (default context.target).", "positive int or None"
    )

    @property
    def enabled(self) -> bool:
        return self.passkey_every is not None

    def validate(self, where: str = "<recipe>") -> None:
        validate_settings(self, key=lambda key: f"{where}: selection.{key}")


class BestWeightsCallback(TrainerCallback):
    """Scores the model every ``every`` steps and at the end with ``score`` (higher is better), keeps a copy of the
    trainable weights that scored best, and puts them back when training ends. The scores go to the trainer's
    ``log_history`` under ``name``; the chosen step under ``selected_step``.

    On a tie the later weights win: they have trained longer for the same held-out score.
    """

    def __init__(self, score: Callable[[torch.nn.Module], float], every: int, name: str, verbose: bool = False):
        self.score, self.every, self.name, self.verbose = score, every, name, verbose
        self.best_score: float | None = None
        self.best_step: int | None = None
        self._best_weights: dict[str, torch.Tensor] = {}
        self._scored_step: int | None = None

    def _score(self, model, state) -> None:
        score = self.score(model)
        self._scored_step = state.global_step
        state.log_history.append({"step": state.global_step, self.name: score})
        if self.best_score is None or score >= self.best_score:
            self.best_score, self.best_step = score, state.global_step
            self._best_weights = {
                name: parameter.detach().clone() for name, parameter in model.named_parameters() if parameter.requires_grad
            }
        if self.verbose:
            print(f"selection: step {state.global_step} {self.name} {score:.3f} (best {self.best_score:.3f} at step "
                  f"{self.best_step})", flush=True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step % self.every == 0:
            self._score(model, state)

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if self._scored_step != state.global_step:
            self._score(model, state)
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                if name in self._best_weights:
                    parameter.copy_(self._best_weights[name])
        state.log_history.append({"step": state.global_step, "selected_step": self.best_step, f"selected_{self.name}": self.best_score})


def passkey_selection(encode: Callable[[str], list[int]], length: int, every: int, trials: int, seed: int):
    """A :class:`BestWeightsCallback` that scores greedy passkey retrieval at ``length`` tokens with full attention."""

    def score(model) -> float:
        return passkey_accuracy(model, encode, length, trials, seed=seed, intro="")

    return BestWeightsCallback(score, every, name=f"passkey_{length}", verbose=True)
