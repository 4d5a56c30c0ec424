"""sit.sampling.batch_record: sample_ddp.py's record beside its .npz, written and read back (values equal the
run's settings, hashes equal the files' and the .npz arrays'), kept or rewritten by reruns, refused for other
weights at the same path, and carried by evaluate.py into its --json output, which refuses a record of other
images (a tiny checkpoint, a tiny VAE, a random Inception)."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

import download
import evaluate
import sample_ddp
from conftest import random_inception_state_dict
from sit import metrics
from sit.cli import run_main
from sit.errors import UsageError
from sit.record import SampleRecord, package_versions, read_record
from sit.sampling.batch_record import summarise_nfe
from test_sample import FAST_ODE, only_folder, run_script, write_checkpoint
from conftest import assert_names

GUIDED = ["ODE", "--sampling-method", "euler", "--num-sampling-steps", "4", "--cfg-scale", "2", "--guide-all-channels",
          "--cfg-interval", "0.2", "0.9", "--num-fid-samples", "5", "--per-proc-batch-size", "2", "--global-seed", "3",
          "--precision", "fp32"]
LABEL_DRAW = ("uniform over 10 classes: torch.randint on a CPU generator seeded by (global seed, image index), as "
              "sit.generation.noise_and_labels")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory, tiny_vae):
    return write_checkpoint(tmp_path_factory.mktemp("ckpt") / "0000002.pt", tiny_vae)


def file_sha256(path) -> str:
    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def sample(flags, sample_dir):
    """Run sample_ddp.py in-process; returns (folder, its record's path)."""
    sample_ddp.main([*flags, "--sample-dir", str(sample_dir)])
    folder = only_folder(sample_dir)
    return folder, f"{folder}.json"


def test_the_record_holds_the_runs_settings_and_the_files_hashes(ckpt, tiny_vae, tmp_path):
    folder, path = sample([*GUIDED, "--ckpt", ckpt], tmp_path / "run")
    lines = sorted(f"{os.path.relpath(os.path.join(root, name), tiny_vae)} {file_sha256(os.path.join(root, name))}\n"
                   for root, _, names in os.walk(tiny_vae) for name in names)
    expected = SampleRecord(
        checkpoint=ckpt, checkpoint_sha256=file_sha256(ckpt), model="custom (depth 1, width 32, patch 2)",
        image_size=32, num_classes=10, vae=os.path.abspath(tiny_vae), mode="ODE", sampling_method="euler",
        num_sampling_steps=4, nfe=3, cfg_scale=2.0, guided_channels=4, guidance_interval=(0.2, 0.9), precision="fp32",
        global_seed=3, label_draw=LABEL_DRAW, num_images=5, image_shape=(32, 32, 3),
        sampler_settings={"atol": 1e-6, "rtol": 1e-3, "reverse": False, "path_type": "Linear", "prediction": "velocity",
                          "loss_weight": None, "train_eps": None, "sample_eps": None, "compile": False},
        versions=package_versions(), checkpoint_file=os.path.abspath(ckpt),
        vae_sha256=hashlib.sha256("".join(lines).encode()).hexdigest(),
        nfe_measured={"batches": 3, "images": 5, "images_not_measured": 0, "per_batch_min": 3, "per_batch_max": 3,
                      "total": 9},
        batch_size=2, world_size=1, preset=None)
    record = read_record(path)
    assert record.sampler_settings.pop("noise_draw").startswith("per image: standard normal on a CPU generator")
    with np.load(f"{folder}.npz") as data:  # the hashes of the arrays' bytes, as numpy holds them
        images, labels = data["arr_0"], data["labels"]
    assert record.images_sha256 == hashlib.sha256(images.tobytes()).hexdigest()
    assert record.labels_sha256 == hashlib.sha256(labels.astype("<i8").tobytes()).hexdigest()
    assert SampleRecord(**{**vars(record), "images_sha256": None, "labels_sha256": None}) == expected
    assert images.shape == (5, *record.image_shape)


def test_a_rerun_keeps_the_record_until_it_samples_again(ckpt, tmp_path):
    flags = [*GUIDED, "--ckpt", ckpt]
    folder, path = sample(flags, tmp_path / "run")
    first, written_at = read_record(path), os.stat(path).st_mtime_ns
    sample(flags, tmp_path / "run")  # finds the .npz
    os.remove(f"{folder}.npz")
    sample(flags, tmp_path / "run")  # rebuilds the .npz from the PNGs
    assert os.stat(path).st_mtime_ns == written_at and read_record(path) == first

    os.remove(f"{folder}.npz")
    os.remove(os.path.join(folder, "000001.png"))  # block 0 (images 0, 1) is sampled again
    sample(flags, tmp_path / "run")
    again = read_record(path)
    assert again.nfe is None  # 4 images were sampled by the first run: not measured by this one
    assert again.nfe_measured == {"batches": 1, "images": 1, "images_not_measured": 4, "per_batch_min": 3,
                                  "per_batch_max": 3, "total": 3}
    assert SampleRecord(**{**vars(again), "nfe": 3, "nfe_measured": first.nfe_measured}) == first


def test_a_rerun_adds_the_arrays_hashes_to_an_older_record_and_keeps_the_rest(ckpt, tmp_path):
    flags = [*GUIDED, "--ckpt", ckpt]
    folder, path = sample(flags, tmp_path / "run")
    first = read_record(path)
    older = {key: value for key, value in json.loads(open(path).read()).items()
             if key not in ("images_sha256", "labels_sha256")}
    with open(path, "w") as handle:  # as a record written before records held the hashes
        json.dump({**older, "nfe": 99}, handle)
    sample(flags, tmp_path / "run")  # samples nothing
    assert read_record(path) == SampleRecord(**{**vars(first), "nfe": 99})  # kept, hashes added


def test_nfe_is_given_per_image_only_when_every_image_was_measured_alike():
    assert summarise_nfe([[(2, 248), (2, 248)], [(1, 248)]], 5) == (
        248, {"batches": 3, "images": 5, "images_not_measured": 0, "per_batch_min": 248, "per_batch_max": 248,
              "total": 744})
    assert summarise_nfe([[(2, 26), (2, 38)]], 4)[0] is None  # an adaptive solver: it varies per batch
    assert summarise_nfe([[], []], 4) == (None, {"batches": 0, "images": 0, "images_not_measured": 4})


def test_heun2_on_125_points_makes_248_model_evaluations_as_the_preset_says(ckpt, tmp_path):
    _, path = sample(["ODE", "--ckpt", ckpt, "--sampling-method", "heun2", "--num-sampling-steps", "125",
                      "--cfg-scale", "1.5", "--num-fid-samples", "2", "--per-proc-batch-size", "2"], tmp_path)
    record = read_record(path)
    assert record.nfe == 248 == 2 * (125 - 1) and record.guided_channels == 3 and record.guidance_interval is None


def test_other_weights_at_the_same_path_are_refused_before_sampling(tiny_vae, tmp_path):
    path = write_checkpoint(tmp_path / "last.pt", tiny_vae, seed=0)
    flags = ["ODE", *FAST_ODE, "--ckpt", path, "--num-fid-samples", "2", "--per-proc-batch-size", "2"]
    folder, record_path = sample(flags, tmp_path / "run")
    old_hash = read_record(record_path).checkpoint_sha256
    write_checkpoint(tmp_path / "last.pt", tiny_vae, seed=1)  # same path, same folder name, other weights
    os.remove(os.path.join(folder, "000001.png"))
    with pytest.raises(UsageError) as raised:
        sample(flags, tmp_path / "run")
    assert_names(raised.value, f"--ckpt {path}", folder, "--sample-dir", old_hash[:12])
    assert not os.path.exists(os.path.join(folder, "000001.png"))  # nothing was sampled


def test_the_published_models_record_names_and_hashes_the_fetched_file(ckpt, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(download.PUBLISHED_MODELS, download.DEFAULT_MODEL, [f"file://{ckpt}"])  # a stand-in download
    _, path = sample(["ODE", *FAST_ODE, "--num-fid-samples", "2", "--per-proc-batch-size", "2"], tmp_path / "samples")
    record = read_record(path)
    assert record.checkpoint == download.DEFAULT_MODEL
    assert record.checkpoint_file == str(tmp_path / "pretrained_models" / download.DEFAULT_MODEL)
    assert record.checkpoint_sha256 == file_sha256(ckpt)


@pytest.mark.slow
def test_two_gloo_processes_record_every_batch_and_the_world_size(ckpt, tmp_path):
    flags = [*GUIDED, "--ckpt", ckpt, "--sample-dir", str(tmp_path / "two")]
    result = run_script(["sample_ddp.py", *flags], cwd=tmp_path, torchrun_procs=2)
    assert result.returncode == 0, result.stderr[-3000:]
    record = read_record(f"{only_folder(tmp_path / 'two')}.json")
    assert record.world_size == 2 and record.nfe == 3
    assert record.nfe_measured == {"batches": 3, "images": 5, "images_not_measured": 0, "per_batch_min": 3,
                                   "per_batch_max": 3, "total": 9}


@pytest.mark.slow
def test_sample_ddp_to_evaluate_json_carries_the_record_and_a_wrong_record_is_one_line(ckpt, tmp_path, capsys):
    folder, path = sample([*GUIDED, "--ckpt", ckpt], tmp_path / "run")
    weights = str(tmp_path / "random_inception.pth")
    torch.save(random_inception_state_dict(seed=0), weights)
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    command = [str(tmp_path / "ref.npz"), f"{folder}.npz", "--device", "cpu", "--batch-size", "4",
               "--inception-weights", weights, "--json", str(tmp_path / "metrics.json")]
    evaluate.main(command)
    written = json.loads((tmp_path / "metrics.json").read_text())
    with open(path) as handle:
        assert written["sample_record"] == json.load(handle)
    assert written["sample_record"]["checkpoint_sha256"] == file_sha256(ckpt) and written["num_samples"] == 5
    assert written["evaluator"]["inception"]["sha256"] == file_sha256(weights)
    capsys.readouterr()

    data = json.loads(open(path).read())
    with open(path, "w") as handle:
        json.dump({**data, "num_images": 50000}, handle)
    assert run_main(lambda: evaluate.main(command), "evaluate.py") == 2
    assert assert_names(capsys.readouterr().err, path, f"{folder}.npz", "50000").startswith("evaluate.py: error: ")


def test_evaluate_refuses_the_record_of_other_images_unless_told_to_ignore_it(ckpt, tmp_path, tiny_dinov2_weights,
                                                                             capsys):
    """Two batches of the same settings but another seed: same count and shape, other images. The record of
    one beside the other's .npz was copied into the metrics before records held the images' hashes."""
    first, _ = sample([*GUIDED, "--ckpt", ckpt], tmp_path / "first")
    second, _ = sample([*GUIDED, "--ckpt", ckpt, "--global-seed", "4"], tmp_path / "second")
    os.replace(f"{first}.json", f"{second}.json")  # the record of the first batch, beside the second's images
    np.savez(tmp_path / "ref.npz", arr_0=np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8))
    command = [str(tmp_path / "ref.npz"), f"{second}.npz", "--device", "cpu", "--metrics", "fd_dinov2",
               "--dinov2-weights", tiny_dinov2_weights, "--json", str(tmp_path / "metrics.json")]
    capsys.readouterr()
    assert run_main(lambda: evaluate.main(command), "evaluate.py") == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert_names(err, "evaluate.py: error: ", f"{second}.json", f"{second}.npz", "images", "--ignore-record")
    assert not os.path.exists(tmp_path / "metrics.json")
    evaluate.main([*command, "--ignore-record"])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["sample_record"] is None and written["sample_record_verified"] is None
    assert written["fd_dinov2"] is not None
    os.replace(f"{second}.json", f"{first}.json")  # back beside its own images: verified and copied
    evaluate.main([str(tmp_path / "ref.npz"), f"{first}.npz", *command[2:]])
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["sample_record_verified"] is True
    assert written["sample_record"] == read_record(f"{first}.json").to_dict()
