"""The passkey demo runs end to end through the recipe machinery (a few steps; the full run is `longlora demo`)."""

import json

from longlora_plugin.demos.passkey import run_passkey_demo


def test_passkey_demo_pipeline_writes_table_json_and_plot(tmp_path):
    lines = []
    result = run_passkey_demo(
        overrides={"training.max_steps": 2, "data.num_samples": 16, "training.output_dir": str(tmp_path / "demo")},
        trials=2,
        speed_lengths=(),
        log=lines.append,
    )
    base, interpolated, extended = result.accuracy
    assert (base, extended) == ("base (256)", "LongLoRA (1024)") and interpolated.endswith("interpolation x4, no fine-tuning")
    assert all(set(by_length) == {256, 512, 768, 1024} for by_length in result.accuracy.values())
    assert result.plot.is_file() and result.plot.stat().st_size > 1000
    saved = json.loads((tmp_path / "demo" / "passkey.json").read_text())
    assert saved["lengths"] == [256, 512, 768, 1024]
    assert (tmp_path / "demo" / "adapter" / "longlora.json").is_file()
    assert any("passkey retrieval accuracy" in line for line in lines)
    assert result.extended_at_target == result.accuracy["LongLoRA (1024)"][1024]
    assert any(line.startswith("goal: LongLoRA >= 90% at 1024 tokens") for line in lines)


def test_demo_seed_sets_the_training_and_data_seeds(monkeypatch):
    import longlora_plugin.demos.passkey as passkey_demo
    from longlora_plugin.cli import main as cli

    seen = {}
    monkeypatch.setattr(passkey_demo, "run_passkey_demo", lambda overrides, **kwargs: seen.update(overrides))
    assert cli(["demo", "--seed", "2"]) == 0
    assert seen == {"training.seed": 2, "data.seed": 2}
