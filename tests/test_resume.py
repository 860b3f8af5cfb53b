"""A run killed with SIGKILL after a checkpoint, then resumed, ends with the adapter of an uninterrupted run."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tests.helpers.launch_setup import make_base_and_data, write_recipe
from safetensors.torch import load_file


def train_command(recipe: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "longlora_plugin.train", str(recipe), *overrides]


ENV = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}


@pytest.mark.slow
def test_sigkill_then_resume_gives_the_uninterrupted_adapter(tmp_path):
    make_base_and_data(tmp_path, records=24)

    def write_run(name):
        return write_recipe(
            tmp_path, name, max_steps=24, learning_rate=5e-3, use_cpu=True, save_strategy="steps", save_steps=4,
            dataloader_num_workers=0,
        )

    straight = write_run("straight")
    subprocess.run(train_command(straight), check=True, capture_output=True, env=ENV, timeout=600)

    killed = write_run("killed")
    checkpoint = tmp_path / "killed" / "checkpoint-4"
    process = subprocess.Popen(train_command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV)
    complete = ("trainer_state.json", "rng_state.pth", "optimizer.pt")
    for _ in range(6000):  # poll up to about 5 minutes
        if all((checkpoint / name).is_file() for name in complete):
            break
        assert process.poll() is None, "the run ended before its step-4 checkpoint"
        time.sleep(0.05)
    else:
        process.kill()
        pytest.fail("no complete step-4 checkpoint appeared")
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "killed" / "adapter").exists()  # killed before the end

    subprocess.run(
        train_command(killed, "--training.resume_from_checkpoint", str(checkpoint)),
        check=True, capture_output=True, env=ENV, timeout=600,
    )
    expected = load_file(tmp_path / "straight" / "adapter" / "adapter_model.safetensors")
    resumed = load_file(tmp_path / "killed" / "adapter" / "adapter_model.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        torch.testing.assert_close(resumed[key], expected[key], atol=1e-6, rtol=1e-5, msg=key)
