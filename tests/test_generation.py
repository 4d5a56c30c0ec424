"""sit.generation's labels and evaluation hook, and the labels sample_ddp.py saves in its .npz: every
image's class, equal to the conditioning sit.generation.noise_and_labels drew for it."""
import os
import zipfile

import numpy as np
import torch
from PIL import Image

import sample_ddp
from sit.generation import ObservedSampleFunction, image_labels, noise_and_labels
from sit.log import create_logger
from sit.metrics.npz import npz_array_shape, open_npz_images
from sit.sampling import folder as sample_folder
from test_grid import pixel_checkpoint
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
