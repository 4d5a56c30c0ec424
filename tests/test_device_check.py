"""benchmarks/device_check.py on the CPU: the rows it runs pass, the CUDA-only ones say SKIPPED,
a wrong recording fails its check, and without the recording the checks hold the device to the CPU."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO

sys.path.insert(0, os.path.join(REPO, "benchmarks"))
from device_check import (CHECKS, SAMPLE_RATE, TRAIN_RATE, bench_rows, logged_rate, parse_args, peak_row,  # noqa: E402
                          random_image_folder, run_checks, script_rows)

SCRIPT = os.path.join(REPO, "benchmarks", "device_check.py")
FIXTURE = os.path.join(REPO, "tests", "fixtures", "parity.pt")
CPU = torch.device("cpu")
# every row of a CPU run, in order, with its result
CPU_ROWS = [
    ("model parity fp32 on cpu", "PASS"),
    ("ODE sample parity fp32 on cpu", "PASS"),
    ("SDE sample parity fp32 on cpu", "PASS"),
    ("bf16 autocast training SiT-S/2 vs fp32", "PASS"),
    ("fp16 autocast training SiT-S/2 vs fp32", "PASS"),
    ("compile: train.py training steps", "PASS"),
    ("compile: sample.py sampler steps", "SKIPPED"),
    ("no host sync inside the training step", "SKIPPED"),
    ("SDPA kernel, XL/2 shapes bf16 on cpu", "PASS"),
    ("SDPA kernel, XL/1 RoPE+QK-norm bf16 on cpu", "PASS"),
    ("process group (gloo), world size 1", "PASS"),
    ("FSDP2 step (world size 1) vs unsharded", "PASS"),
    ("FSDP2 bf16+compile+ckpt+clip vs fp32", "PASS"),
    ("sample.py end to end, tiny SiT", "PASS"),
    ("bench.py SiT-XL/2 and LightningDiT-XL/1, batch 64, bf16, compile", "SKIPPED"),
    ("scripts: train.py, sample_ddp.py vs bench", "SKIPPED"),
]


def table_rows(stdout: str) -> list[list[str]]:
    """The table's rows (after the header) as [check, result, figure, tolerance]."""
    lines = [line for line in stdout.splitlines() if line.count(" | ") == 3]
    assert [cell.strip() for cell in lines[0].split(" | ")] == ["check", "result", "figure", "tolerance"]
    return [[cell.strip() for cell in line.split(" | ")] for line in lines[1:]]


@pytest.mark.slow
def test_cpu_run_passes_what_runs_here_and_skips_the_cuda_parts(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run([sys.executable, SCRIPT, "--json", str(tmp_path / "rows.json")], capture_output=True,
                            text=True, env=env, cwd=tmp_path, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    rows = table_rows(result.stdout)
    assert [(row[0], row[1]) for row in rows] == CPU_ROWS, result.stdout
    for check, status, figure, tolerance in rows:
        assert figure and tolerance, check
        if status == "SKIPPED":
            assert tolerance == "-" and ("CUDA" in figure or "GPU" in figure)
    assert "summary: 12 PASS, 4 SKIPPED" in result.stdout
    stored = json.loads((tmp_path / "rows.json").read_text())["rows"]
    assert [[row["check"], row["result"], row["figure"], row["tolerance"]] for row in stored] == rows


def test_a_recording_the_model_does_not_match_fails_its_check(tmp_path):
    golden = torch.load(FIXTURE, weights_only=True)
    golden["forward"]["out"] = golden["forward"]["out"] * 1.01
    torch.save(golden, tmp_path / "parity.pt")
    reported = []
    rows = run_checks(["parity", "sampler"], REPO, CPU, str(tmp_path / "parity.pt"),
                      lambda name, found, seconds: reported.append(name))
    assert reported == ["parity", "sampler"]
    assert [row.result for row in rows] == ["FAIL", "PASS", "PASS"]
    assert rows[0].figure.startswith("max rel err 9.9") and rows[0].tolerance == "<= 1e-04"  # 1 - 1/1.01


def test_a_check_that_raises_is_one_fail_row_and_the_others_still_run(tmp_path):
    (tmp_path / "parity.pt").write_bytes(b"not a checkpoint")
    rows = run_checks(["parity", "sdpa"], REPO, CPU, str(tmp_path / "parity.pt"), lambda *report: None)
    assert (rows[0].check, rows[0].result) == ("parity", "FAIL") and rows[0].figure.startswith("UnpicklingError")
    assert rows[1].result == "PASS" and "flash_attention" in rows[1].figure
    assert rows[2].check == "SDPA kernel, XL/1 RoPE+QK-norm bf16 on cpu"  # q, k turned and normalised first
    assert rows[2].result == "PASS" and "flash_attention" in rows[2].figure


def test_without_the_recording_the_device_is_held_to_the_cpu(tmp_path):
    rows = run_checks(["parity", "sampler"], REPO, CPU, str(tmp_path / "absent.pt"), lambda *report: None)
    assert [(row.result, row.figure) for row in rows] == [("PASS", "max rel err 0.00e+00"), ("PASS", "rel err 0.00e+00"),
                                                          ("PASS", "rel err 0.00e+00")]


def test_check_names_are_the_command_line_choices(capsys):
    assert list(CHECKS) == ["parity", "sampler", "autocast", "compile", "sync", "sdpa", "distributed", "sample", "bench",
                            "scripts"]
    with pytest.raises(SystemExit):
        parse_args(["--only", "nccl"])
    assert "invalid choice: 'nccl'" in capsys.readouterr().err


def bench_record(scale: float, peak: float) -> dict:
    """A bench.py --json record (its row names) whose optimised rows run `scale` times the baseline's speed."""
    def row(images_per_s: float, tflops: float = 0.0) -> dict:
        return dict(images_per_s=images_per_s, seconds=64 / images_per_s, memory_gib=40.0, tflops=tflops)

    rows = {"baseline": row(100.0, 100.0), "from images": row(150.0), "cached latents": row(100.0 * scale, 100.0 * scale),
            "ODE baseline": row(200.0), "ODE optimised": row(200.0 * scale), "SDE baseline": row(100.0),
            "SDE optimised": row(100.0 * scale)}
    return dict(device="NVIDIA H200", bf16_peak_tflops=peak, rows=rows)


def test_bench_rows_hold_the_measured_speeds_to_the_targets():
    met = bench_rows(bench_record(4.0, 989.0))  # 400 TFLOP/s of 989: 40.4%
    assert [(row.check, row.result) for row in met] == [
        ("bench: training vs original loop", "PASS"), ("bench: fraction of bf16 peak", "PASS"),
        ("bench: ODE sampler step vs original", "PASS"), ("bench: SDE sampler step vs original", "PASS"),
        ("bench: peak memory, training", "INFO")]
    assert met[0].figure == "400 img/s (cached latents) vs 100: 4.00x; from images 150" and met[0].tolerance == ">= 3 (target)"
    assert met[1].figure == "400 TFLOP/s of 989: 40%"
    missed = bench_rows(bench_record(1.5, 0.0))
    assert [row.result for row in missed] == ["MISS", "INFO", "MISS", "MISS", "INFO"]
    assert missed[1].figure == "150 TFLOP/s; peak of NVIDIA H200 unknown"


def test_the_block_row_holds_a_training_only_record_to_the_peak():
    """bench.py --train-only records only the training rows; the LightningDiT row reads the cached-latents one."""
    record = bench_record(4.0, 989.0)
    record["rows"] = {name: record["rows"][name] for name in ("from images", "cached latents")}
    row = peak_row("bench: LightningDiT-XL/1 fraction of bf16 peak", record)
    assert (row.result, row.figure, row.tolerance) == ("PASS", "400 TFLOP/s of 989: 40%", ">= 0.4 (target)")
    record["rows"]["cached latents"]["tflops"] = 300.0
    assert peak_row("block", record).result == "MISS"
    assert peak_row("block", {**record, "bf16_peak_tflops": 0.0}).result == "INFO"


def test_script_rows_read_the_scripts_logs_and_hold_them_to_the_benchmark():
    train_log = ("[2026-12-04 10:00:00] (step=0000020) Train Loss: 0.9, Train Steps/Sec: 7.00, Images/Sec: 448.0\n"
                 "[2026-12-04 10:00:03] (step=0000040) Train Loss: 0.8, Train Steps/Sec: 7.60, Images/Sec: 486.4\n")
    sample_log = ("[2026-12-04 10:01:00] Sampled 192 images in 72.0 s: 2.67 img/s (model, VAE decode and PNGs, all "
                  "processes); after the first batch (warm-up, compilation): 16.00 img/s\n")
    assert logged_rate(train_log, TRAIN_RATE) == 486.4 and logged_rate(sample_log, SAMPLE_RATE) == 16.0  # the last
    assert logged_rate("no rate here", TRAIN_RATE) is None
    record = bench_record(5.0, 989.0)  # cached latents 500 img/s, SDE step 500 (optimised) and 100 (original-style)
    rows = script_rows(486.4, 9.6, record, 50)
    assert [(row.check, row.result, row.tolerance) for row in rows] == [
        ("scripts: train.py / bench step", "PASS", ">= 0.97 (target)"),  # 486.4 / 500 = 0.973
        ("scripts: sample_ddp.py / bench SDE step", "PASS", ">= 0.9 (target)"),  # 9.6 x 50 / 500 = 0.96
        ("scripts: sample_ddp.py / original-style SDE", "MISS", ">= 5 (target)")]  # 9.6 / (100 / 50) = 4.8x
    assert rows[0].figure == "486.4 vs 500.0 img/s (cached latents): 0.973"
    assert rows[1].figure == "9.60 img/s x 50 steps vs 500.0: 0.960"
    assert rows[2].figure == "9.60 vs <= 2.00 img/s: 4.80x"
    assert [row.result for row in script_rows(1.0, 2.0, None, 50)] == ["INFO", "INFO"]


def test_random_image_folder_is_one_class_of_rgb_images(tmp_path):
    from PIL import Image

    folder = random_image_folder(str(tmp_path / "images"), 3, 16)
    assert sorted(os.listdir(os.path.join(folder, "class0"))) == ["00000.png", "00001.png", "00002.png"]
    with Image.open(os.path.join(folder, "class0", "00001.png")) as image:
        assert (image.size, image.mode) == ((16, 16), "RGB")
