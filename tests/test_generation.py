"""sit.generation's labels and evaluation hook, and the labels sample_ddp.py saves in its .npz: every
image's class, equal to the conditioning sit.generation.noise_and_labels drew for it; balanced labels
(--label-sampling balanced): exact counts, the same for any number of processes, in the record and folder."""
import json
import os
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

import sample_ddp
from sit.errors import UsageError
from sit.generation import (ObservedSampleFunction, balanced_labels, blocks_of_rank, image_labels, index_blocks,
                            noise_and_labels, planned_labels)
from sit.log import create_logger
from sit.record import read_record
from conftest import assert_names
from sit.metrics.npz import npz_array_shape, open_npz_images
from sit.sampling import folder as sample_folder
from test_grid import pixel_checkpoint
from test_sample import sample_as_three_ranks
from transport import Sampler, create_transport


def test_image_labels_are_the_labels_noise_and_labels_draws_in_any_chunks():
    _, expected = noise_and_labels(range(23), 5, (3, 4, 4), 7)
    for chunk in (1, 4, 23, 100):
        labels = image_labels(23, 5, (3, 4, 4), 7, chunk=chunk)
        assert labels.dtype == np.int64 and np.array_equal(labels, expected.numpy())
    assert image_labels(0, 5, (3, 4, 4), 7).shape == (0,)


def test_an_observed_sample_function_reports_every_evaluation_and_changes_nothing():
    sample_fn = Sampler(create_transport()).sample_ode(sampling_method="euler", num_steps=5)
    model = lambda x, t, y: x * 0.5 + t[:, None] * y[:, None]  # noqa: E731  a velocity field (N, D)
    x, y = torch.randn(3, 2), torch.tensor([1.0, 2.0, 3.0])
    seen = []
    observed = ObservedSampleFunction(sample_fn, seen.append)
    assert torch.equal(observed(x, model, y=y)[-1], sample_fn(x, model, y=y)[-1])
    assert observed.nfe == sample_fn.nfe == 4 and seen == [0.0, 0.25, 0.5, 0.75]  # euler on 5 grid points


def test_sample_ddp_saves_every_images_label_beside_arr_0(tmp_path, capsys):
    ckpt = pixel_checkpoint(tmp_path / "model.pt")
    sample_ddp.main(["ODE", "--ckpt", ckpt, "--sampling-method", "euler", "--num-sampling-steps", "3", "--cfg-scale",
                     "1.5", "--num-fid-samples", "7", "--per-proc-batch-size", "3", "--global-seed", "4",
                     "--sample-dir", str(tmp_path / "samples")])
    out = capsys.readouterr().out
    (npz,) = [name for name in os.listdir(tmp_path / "samples") if name.endswith(".npz")]
    path = str(tmp_path / "samples" / npz)
    with np.load(path) as data:
        assert sorted(data.files) == ["arr_0", "labels"]
        images, labels = data["arr_0"], data["labels"]
    _, conditioned = noise_and_labels(range(7), 4, (3, 4, 4), 10)  # image i's label, as sampling drew it
    assert labels.dtype == np.int64 and np.array_equal(labels, conditioned.numpy())
    assert len(set(labels.tolist())) > 1
    # the metrics read arr_0 only, memory-mapped from the stored .npz, as before
    assert npz_array_shape(path) == (7, 4, 4, 3) and np.array_equal(open_npz_images(path), images)
    assert "and their class labels as 'labels'" in out
    assert "with ODE euler, 3 steps" in out and "euler, 3 steps: 2 model evaluations per batch" in out


def test_an_older_npz_without_labels_is_rebuilt_with_them(tmp_path):
    folder = tmp_path / "samples" / "run"
    folder.mkdir(parents=True)
    for index in range(3):
        Image.fromarray(np.full((2, 2, 3), index, np.uint8)).save(sample_folder.png_path(str(folder), index))
    path = sample_folder.create_npz_from_sample_folder(str(folder), 3)  # as earlier versions wrote it
    with zipfile.ZipFile(path) as archive:
        assert archive.namelist() == ["arr_0.npy"]
    sample_folder.finish_npz(str(folder), 3, create_logger(None), np.array([4, 0, 9]))
    with np.load(path) as data:
        assert data["labels"].tolist() == [4, 0, 9] and data["arr_0"][:, 0, 0, 0].tolist() == [0, 1, 2]


#################################################################################
#                       --label-sampling balanced                               #
#################################################################################

def labels_of_a_run(num_images: int, batch_size: int, world_size: int, planned: np.ndarray) -> np.ndarray:
    """The label each index is conditioned on when `world_size` ranks sample their blocks (generate_blocks' draw)."""
    labels = np.full(num_images, -1)
    for rank in range(world_size):
        for block in blocks_of_rank(index_blocks(num_images, batch_size), rank, world_size):
            labels[list(block)] = noise_and_labels(block, 3, (3, 2, 2), 5, planned)[1].numpy()
    return labels


def test_balanced_labels_give_every_class_exactly_its_share_whatever_the_process_count():
    labels = balanced_labels(40, 3, 5)
    assert labels.dtype == np.int64 and labels.shape == (40,)
    assert np.bincount(labels, minlength=5).tolist() == [8] * 5
    assert not np.array_equal(labels, np.arange(40) % 5)  # a seeded order, not classes in turn
    assert np.array_equal(labels, balanced_labels(40, 3, 5))  # a pure function of (seed, N, classes)
    assert not np.array_equal(labels, balanced_labels(40, 4, 5))
    for world_size in (1, 2, 3):
        for batch_size in (1, 4, 7):
            assert np.array_equal(labels_of_a_run(40, batch_size, world_size, labels), labels)
    assert planned_labels("random", 40, 3, 5) is None and np.array_equal(planned_labels("balanced", 40, 3, 5), labels)
    with pytest.raises(ValueError, match="multiple of the 5 classes, got 41"):
        balanced_labels(41, 3, 5)


def test_planned_labels_leave_each_images_noise_as_the_random_draw_has_it():
    planned = balanced_labels(6, 0, 3)
    z_random, _ = noise_and_labels(range(6), 0, (4, 2, 2), 3)
    z_balanced, y_balanced = noise_and_labels(range(6), 0, (4, 2, 2), 3, planned)
    assert torch.equal(z_random, z_balanced) and y_balanced.tolist() == planned.tolist()


def test_sample_ddp_balanced_labels_are_counted_recorded_and_named_in_the_folder(tmp_path):
    ckpt = pixel_checkpoint(tmp_path / "model.pt")  # 10 classes
    flags = ["ODE", "--ckpt", ckpt, "--sampling-method", "euler", "--num-sampling-steps", "2", "--num-fid-samples",
             "20", "--per-proc-batch-size", "3", "--global-seed", "2"]
    sample_ddp.main([*flags, "--label-sampling", "balanced", "--sample-dir", str(tmp_path / "balanced")])
    sample_ddp.main([*flags, "--sample-dir", str(tmp_path / "random")])
    (balanced,) = [name[:-4] for name in os.listdir(tmp_path / "balanced") if name.endswith(".npz")]
    (random,) = [name[:-4] for name in os.listdir(tmp_path / "random") if name.endswith(".npz")]
    assert balanced == f"{random}-labels-balanced-20"  # the random folder keeps its name
    with np.load(tmp_path / "balanced" / f"{balanced}.npz") as data:
        images, labels = data["arr_0"], data["labels"]
    assert np.bincount(labels, minlength=10).tolist() == [2] * 10
    assert np.array_equal(labels, balanced_labels(20, 2, 10))
    record = read_record(str(tmp_path / "balanced" / f"{balanced}.json"))
    assert record.label_sampling == "balanced" and record.label_draw.startswith("balanced: exactly 2 images of each")
    with open(tmp_path / "random" / f"{random}.json") as handle:
        assert "label_sampling" not in json.load(handle)  # random's record is as before
    # the ranks of a 3-process job, run one after another here, give the one-process images and labels
    folder = sample_as_three_ranks([*flags, "--label-sampling", "balanced", "--sample-dir", str(tmp_path / "three")])
    three = np.stack([np.asarray(Image.open(sample_folder.png_path(folder, index))) for index in range(20)])
    assert os.path.basename(folder) == balanced and np.array_equal(three, images)


def test_balanced_labels_need_a_multiple_of_the_classes_and_no_likelihood(tmp_path):
    ckpt = pixel_checkpoint(tmp_path / "model.pt")
    with pytest.raises(UsageError) as error:
        sample_ddp.main(["ODE", "--ckpt", ckpt, "--label-sampling", "balanced", "--num-fid-samples", "25",
                         "--sample-dir", str(tmp_path / "samples")])
    assert_names(error.value, "--num-fid-samples", "--label-sampling balanced", "multiple of 10", "20 or 30")
    assert not os.path.exists(tmp_path / "samples")
    with pytest.raises(UsageError) as error:
        sample_ddp.parse_args(["ODE", "--likelihood", "--label-sampling", "balanced"])
    assert_names(error.value, "--label-sampling balanced", "--likelihood")


def test_the_presets_state_their_label_protocol_and_warn_when_another_is_chosen():
    from sit.sampling.presets import PRESETS, preset_table

    assert {preset.label_sampling for preset in PRESETS.values()} == {"random"}
    assert preset_table().count("    labels:    random (") == len(PRESETS)
    _, config, preset = sample_ddp.parse_command_line(["--preset", "sit-xl2-256-sde", "--label-sampling", "balanced"])
    assert config.label_sampling == "balanced" and config.num_images == 50_000
    (warning,) = preset.warnings()
    assert_names(warning, "--preset sit-xl2-256-sde", "random labels", "--label-sampling balanced")
    assert sample_ddp.parse_command_line(["--preset", "sit-xl2-256-sde"])[2].warnings() == []
