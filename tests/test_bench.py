"""benchmarks/bench.py runs end to end on a tiny setting and reports consistent rows."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

BENCH = os.path.join(REPO, "benchmarks", "bench.py")
ROWS = ["baseline", "from images", "cached latents", "ODE baseline", "ODE optimised", "SDE baseline", "SDE optimised"]


def run_bench(*flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, BENCH, *flags], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_tiny_benchmark_prints_every_row_and_writes_consistent_json(tmp_path):
    json_path = tmp_path / "bench.json"
    result = run_bench("--model", "SiT-S/8", "--image-size", "64", "--batch-size", "2", "--precision", "fp32",
                       "--steps", "1", "--warmup", "0", "--profile", str(tmp_path / "profile"), "--json", str(json_path))
    assert result.returncode == 0, result.stderr[-2000:]
    for line in ["matmul (2048 x 2048) on this device: fp32 ", "train, baseline (original loop)",
                 "ODE sampler step, optimised", "sampling speed-up, SDE step:"]:
        assert line in result.stdout, line
    for name in ("train-step-cached-latents", "ode-step-baseline", "ode-step-optimised"):  # one step's table each
        path = tmp_path / "profile" / f"{name}.txt"
        assert f"profile of {name}: {path}\n" in result.stdout
        table = path.read_text().splitlines()
        assert table[0] == f"{name}: one step on cpu, sorted by self_cpu_time_total"
        assert "Self CPU %" in table[2] and any(line.strip().startswith("aten::") for line in table)
    assert any("aten::mm" in line or "aten::addmm" in line for line in (tmp_path / "profile" / "ode-step-optimised.txt").open())
    record = json.loads(json_path.read_text())
    assert (record["model"], record["image_size"], record["batch_size"]) == ("SiT-S/8", 64, 2)
    rows = record["rows"]
    assert sorted(rows) == sorted(ROWS)
    for row in rows.values():
        assert row["images_per_s"] == pytest.approx(2 / row["seconds"], rel=1e-12)
    # the original's SDE drift runs the model twice, ours once: twice the FLOPs in the baseline's row
    sde_flops = {name: rows[name]["tflops"] * rows[name]["seconds"] for name in ("SDE baseline", "SDE optimised")}
    assert sde_flops["SDE baseline"] == pytest.approx(2 * sde_flops["SDE optimised"], rel=1e-9)
    ode_flops = rows["ODE baseline"]["tflops"] * rows["ODE baseline"]["seconds"]
    assert ode_flops == pytest.approx(sde_flops["SDE optimised"], rel=1e-9)


def test_bad_settings_are_refused_with_one_line():
    result = run_bench("--image-size", "60")
    assert result.returncode == 2
    assert "--image-size must be a multiple of 8" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_train_only_measures_the_training_steps_of_a_block_option_model(tmp_path):
    """--train-only --skip-baseline-train (device_check.py's LightningDiT row): the two training rows only."""
    json_path = tmp_path / "bench.json"
    result = run_bench("--model", "LightningDiT-B/1", "--image-size", "32", "--batch-size", "2", "--precision", "fp32",
                       "--steps", "1", "--warmup", "0", "--skip-baseline-train", "--train-only", "--json", str(json_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "sampler step" not in result.stdout and "speed-up" not in result.stdout
    rows = json.loads(json_path.read_text())["rows"]
    assert sorted(rows) == ["cached latents", "from images"]
    assert all(row["tflops"] > 0 for row in rows.values())
