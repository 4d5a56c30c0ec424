"""The record beside a sample batch (sit.record): written and read back with a synthetic .npz, checked
against the .npz (count, shape and the SHA-256 of its arrays), and copied by evaluate.py into its --json output
with the evaluator's settings; a record of other images is refused, --ignore-record evaluates without it.
(FD-DINOv2 with the tiny ViT keeps evaluate.py fast here; the Inception's settings are checked with
real weights in test_inception_weights.py.)"""
import hashlib
import json

import numpy as np
import pytest

from conftest import assert_names
import evaluate
from sit.errors import UsageError
from sit.files import sha256_file
from sit.metrics import MetricInputError, npz_array_shape
from sit.record import (RECORD_FORMAT, RecordError, SampleRecord, npz_array_sha256, npz_hashes, package_versions,
                        read_record, record_beside, record_path, write_record)


def synthetic_record(**overrides) -> SampleRecord:
    fields = dict(checkpoint="pretrained_models/SiT-XL-2-256x256.pt", checkpoint_sha256="ab" * 32, model="SiT-XL/2",
                  image_size=256, num_classes=1000, vae="ema", mode="ODE", sampling_method="heun2",
                  num_sampling_steps=125, nfe=250, cfg_scale=1.5, guided_channels=3, guidance_interval=None,
                  precision="fp32", global_seed=0, label_draw="uniform over 1000 classes, seeded per image index",
                  num_images=6, image_shape=(40, 40, 3), sampler_settings={"atol": 1e-6, "rtol": 1e-3},
                  versions=package_versions())
    fields.update(overrides)
    return SampleRecord(**fields)


@pytest.fixture
def batch(tmp_path):
    """A synthetic sample batch (6, 40, 40, 3) and a reference (7, 40, 40, 3)."""
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "samples.npz", arr_0=rng.integers(0, 256, (6, 40, 40, 3), dtype=np.uint8))
    np.savez(tmp_path / "ref.npz", arr_0=rng.integers(0, 256, (7, 40, 40, 3), dtype=np.uint8))
    return tmp_path


def test_the_npz_shape_is_read_from_its_header_stored_or_compressed(batch):
    np.savez_compressed(batch / "compressed.npz", arr_0=np.zeros((3, 8, 9, 3), dtype=np.uint8), labels=np.arange(3))
    assert npz_array_shape(str(batch / "compressed.npz")) == (3, 8, 9, 3)
    assert npz_array_shape(str(batch / "samples.npz")) == (6, 40, 40, 3)
    with pytest.raises(MetricInputError) as error:
        npz_array_shape(str(batch / "compressed.npz"), "images")
    assert_names(error.value, str(batch / "compressed.npz"), "'images'", "arr_0.npy, labels.npy")  # what it holds
    (batch / "text.npz").write_text("not an npz")
    with pytest.raises(MetricInputError) as error:
        npz_array_shape(str(batch / "text.npz"))
    assert_names(error.value, str(batch / "text.npz"), "readable")


def test_record_path_is_the_npz_name_with_json():
    assert record_path("samples/SiT-XL-2-cfg-1.5.npz") == "samples/SiT-XL-2-cfg-1.5.json"
    assert record_path("/a/b.c/samples") == "/a/b.c/samples.json"


def test_record_is_written_beside_the_npz_and_read_back_equal(batch):
    record = synthetic_record(guidance_interval=(0.0, 0.7))
    path = write_record(str(batch / "samples.npz"), record)
    assert path == str(batch / "samples.json")
    data = json.loads((batch / "samples.json").read_text())
    assert data["format"] == RECORD_FORMAT and data["version"] == 1
    assert data["image_shape"] == [40, 40, 3] and data["guidance_interval"] == [0.0, 0.7]
    assert data["versions"]["torch"] == package_versions()["torch"]
    assert read_record(path) == record
    assert record_beside(str(batch / "samples.npz"), 6, (40, 40, 3)) == record
    assert record_beside(str(batch / "ref.npz"), 7, (40, 40, 3)) is None  # no record: nothing to check


@pytest.mark.parametrize("count,shape", [(5, (40, 40, 3)), (6, (32, 32, 3))])  # another count, another shape
def test_a_record_that_disagrees_with_the_npz_is_refused_in_one_line(batch, count, shape):
    write_record(str(batch / "samples.npz"), synthetic_record(num_images=count, image_shape=shape))
    with pytest.raises(RecordError) as raised:
        record_beside(str(batch / "samples.npz"), 6, (40, 40, 3))
    assert_names(raised.value, str(batch / "samples.json"), f"{count} images of {'x'.join(map(str, shape))}",
                 str(batch / "samples.npz"), "6 of 40x40x3")


def test_files_that_are_not_records_are_refused_naming_them(batch):
    (batch / "a.json").write_text("{not json")
    data = synthetic_record().to_dict()
    (batch / "b.json").write_text(json.dumps({"fid": 2.06}))
    (batch / "c.json").write_text(json.dumps({**data, "version": 2}))
    del data["nfe"], data["cfg_scale"]
    (batch / "d.json").write_text(json.dumps(data))
    (batch / "e.json").write_text(json.dumps({**synthetic_record().to_dict(), "image_shape": [40, 40]}))
    for name, words in (("a.json", ["JSONDecodeError"]), ("b.json", ["sit-sample-record"]), ("c.json", ["version 2"]),
                        ("d.json", ["nfe, cfg_scale"]), ("e.json", ["image_shape", "[40, 40]"])):
        with pytest.raises(RecordError) as error:
            read_record(str(batch / name))
        assert_names(error.value, str(batch / name), *words)


def test_evaluate_copies_the_record_and_its_own_settings_into_the_json(batch, tiny_dinov2_weights, capsys):
    record = synthetic_record()
    write_record(str(batch / "samples.npz"), record)
    evaluate.main([str(batch / "ref.npz"), str(batch / "samples.npz"), "--device", "cpu", "--metrics", "fd_dinov2",
                   "--dinov2-weights", tiny_dinov2_weights, "--json", str(batch / "metrics.json")])
    written = json.loads((batch / "metrics.json").read_text())
    assert written["sample_record"] == record.to_dict()
    settings = written["evaluator"]
    assert settings["metrics"] == ["fd_dinov2"] and settings["fid_method"] == "eigh"
    assert settings["reference"] == {"path": str(batch / "ref.npz"), "sha256": sha256_file(str(batch / "ref.npz"))}
    assert settings["dinov2"] == {"weights": tiny_dinov2_weights, "sha256": sha256_file(tiny_dinov2_weights),
                                  "resize": "bicubic 224x224, antialiased (edm2's torch resize)"}
    assert settings["versions"] == package_versions()
    assert "FD-DINOv2" in capsys.readouterr().out


def test_evaluate_refuses_a_disagreeing_record_before_any_network_and_keeps_the_record_safe(batch):
    write_record(str(batch / "samples.npz"), synthetic_record(num_images=50000))
    with pytest.raises(RecordError) as error:
        evaluate.main([str(batch / "ref.npz"), str(batch / "samples.npz"), "--device", "cpu",
                       "--inception-weights", str(batch / "no-such-weights.pth")])  # never reached
    assert_names(error.value, str(batch / "samples.json"), "50000 images", "6 of 40x40x3")
    with pytest.raises(UsageError) as error:
        evaluate.main([str(batch / "ref.npz"), str(batch / "samples.npz"), "--json", str(batch / "samples.json")])
    assert_names(error.value, f"--json {batch / 'samples.json'}", "record")


def test_the_arrays_hashes_are_those_of_their_bytes_stored_or_compressed(batch):
    images = np.load(batch / "samples.npz")["arr_0"]
    assert npz_array_sha256(str(batch / "samples.npz")) == hashlib.sha256(images.tobytes()).hexdigest()
    labels = np.arange(6, dtype=np.int64)
    np.savez_compressed(batch / "compressed.npz", arr_0=images, labels=labels)
    assert npz_hashes(str(batch / "compressed.npz")) == {"images_sha256": hashlib.sha256(images.tobytes()).hexdigest(),
                                                         "labels_sha256": hashlib.sha256(labels.tobytes()).hexdigest()}
    assert npz_hashes(str(batch / "samples.npz"))["labels_sha256"] is None  # no labels array


@pytest.mark.parametrize("what", ["images", "labels"])
def test_a_record_of_other_images_is_refused_naming_the_json_and_the_npz(batch, what):
    other = np.zeros((6, 40, 40, 3), np.uint8)  # same count and shape: only the hash tells them apart
    np.savez(batch / "other.npz", arr_0=other, labels=np.arange(6))
    hashes = npz_hashes(str(batch / "other.npz"))
    if what == "labels":
        np.savez(batch / "samples.npz", arr_0=other, labels=np.arange(6)[::-1])
    write_record(str(batch / "samples.npz"), synthetic_record(**hashes))
    with pytest.raises(RecordError) as raised:
        record_beside(str(batch / "samples.npz"), 6, (40, 40, 3))
    assert_names(raised.value, str(batch / "samples.json"), str(batch / "samples.npz"), what,
                 hashes[f"{what}_sha256"][:12], "--ignore-record")
    write_record(str(batch / "other.npz"), synthetic_record(**hashes))
    assert record_beside(str(batch / "other.npz"), 6, (40, 40, 3)).images_sha256 == hashes["images_sha256"]


def test_an_older_record_without_hashes_is_copied_as_unverified_with_a_warning(batch, tiny_dinov2_weights, capsys):
    record = synthetic_record()
    write_record(str(batch / "samples.npz"), record)
    assert "images_sha256" not in json.loads((batch / "samples.json").read_text())  # omitted, as in older records
    evaluate.main([str(batch / "ref.npz"), str(batch / "samples.npz"), "--device", "cpu", "--metrics", "fd_dinov2",
                   "--dinov2-weights", tiny_dinov2_weights, "--json", str(batch / "metrics.json")])
    written = json.loads((batch / "metrics.json").read_text())
    assert written["sample_record"] == record.to_dict() and written["sample_record_verified"] is False
    warning = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and str(batch / "samples.json") in warning[0] and "unverified" in warning[0]
