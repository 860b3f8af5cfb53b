"""Checkpoint selection by a held-out score: the best-scoring trainable weights are the ones a run ends with."""

import torch
from safetensors.torch import load_file
from transformers import TrainerControl, TrainerState, TrainingArguments

import longlora_plugin.eval.selection as selection
from longlora_plugin.eval.selection import BestWeightsCallback
from longlora_plugin.demos.passkey import run_passkey_demo


class TwoWeights(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.trained = torch.nn.Parameter(torch.zeros(3))
        self.frozen = torch.nn.Parameter(torch.zeros(3), requires_grad=False)


def run_steps(callback, model, steps: int) -> TrainerState:
    """Step i sets every weight to i, then the callback sees the step end."""
    args, state, control = TrainingArguments(output_dir="unused", report_to="none"), TrainerState(), TrainerControl()
    for step in range(1, steps + 1):
        with torch.no_grad():
            model.trained.fill_(step)
            model.frozen.fill_(step)
        state.global_step = step
        callback.on_step_end(args, state, control, model=model)
    callback.on_train_end(args, state, control, model=model)
    return state


def scripted(scores: dict[int, float]):
    """A score that reads the step back from the weights."""
    return lambda model: scores[int(model.trained[0])]


def test_the_best_scoring_step_is_restored_and_frozen_weights_are_left_alone():
    model = TwoWeights()
    callback = BestWeightsCallback(scripted({1: 0.2, 2: 0.9, 3: 0.5, 4: 0.4}), every=1, name="score")
    state = run_steps(callback, model, 4)
    assert torch.equal(model.trained, torch.full((3,), 2.0))
    assert torch.equal(model.frozen, torch.full((3,), 4.0))
    assert [entry["score"] for entry in state.log_history if "score" in entry] == [0.2, 0.9, 0.5, 0.4]
    assert state.log_history[-1] == {"step": 4, "selected_step": 2, "selected_score": 0.9}


def test_a_tie_keeps_the_later_step():
    model = TwoWeights()
    run_steps(BestWeightsCallback(scripted({1: 0.9, 2: 0.9, 3: 0.1}), every=1, name="score"), model, 3)
    assert torch.equal(model.trained, torch.full((3,), 2.0))


def test_the_last_step_is_scored_when_it_is_off_the_grid():
    model = TwoWeights()
    scored = []

    def score(model):
        scored.append(int(model.trained[0]))
        return {3: 0.5, 4: 0.6}[scored[-1]]

    run_steps(BestWeightsCallback(score, every=3, name="score"), model, 4)
    assert scored == [3, 4]
    assert torch.equal(model.trained, torch.full((3,), 4.0))


def test_the_demo_recipe_ends_with_the_selected_weights_and_saves_them(tmp_path, monkeypatch):
    """Through the real trainer: held-out scores are scripted per scoring call; the model the run returns (and
    saves) holds the weights of the best call, not the last step's."""
    snapshots = []

    def scripted_accuracy(model, *args, **kwargs):
        snapshots.append({name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad})
        return [0.25, 1.0, 0.5][len(snapshots) - 1]

    monkeypatch.setattr(selection, "passkey_accuracy", scripted_accuracy)
    lines = []
    result = run_passkey_demo(
        overrides={
            "training.max_steps": 3, "training.learning_rate": 0.05, "data.num_samples": 24,
            "selection.passkey_every": 1, "training.output_dir": str(tmp_path / "demo"),
        },
        trials=1, speed_lengths=(), log=lines.append,
    )
    assert len(snapshots) == 3
    assert any("kept the weights of step 2" in line for line in lines)
    kept, last = snapshots[1], snapshots[2]
    saved = load_file(tmp_path / "demo" / "adapter" / "adapter_model.safetensors")
    lora = [name for name in kept if "lora_A" in name or "lora_B" in name]
    assert lora and all(torch.equal(saved[name.replace(".default", "")], kept[name]) for name in lora)
    assert any(not torch.equal(last[name], kept[name]) for name in lora)
    assert result.extended_at_target is not None
