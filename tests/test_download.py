"""download.py: safe loading, atomic downloads (local http server, file:// URLs, a faked hub), clear
errors, and building the right model for a checkpoint. No network: everything is on 127.0.0.1."""
import argparse
import http.server
import os
import socket
import threading

import huggingface_hub
import pytest
import torch
from conftest import MakesMarker, assert_names

import download
import models
from download import CheckpointError, find_model, load_checkpoint
from sit.checkpoint import load_model

TINY = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)


@pytest.fixture(autouse=True)
def in_tmp_cwd(tmp_path, monkeypatch):
    """Every test runs in its own folder, so pretrained_models/ is fresh and nothing leaks out."""
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def offline_hub(monkeypatch):
    """huggingface_hub.hf_hub_download fails as it would without network, recording each call."""
    calls = []

    def fail(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        raise ConnectionError("Max retries exceeded (no network in tests)")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fail)
    return calls


def hub_stand_in(monkeypatch, cache_file) -> list:
    """huggingface_hub.hf_hub_download answers every request with `cache_file` (as if already in the hub's
    cache), recording each (repo_id, filename)."""
    calls = []

    def fake_hub_download(repo_id, filename, **kwargs):
        calls.append((repo_id, filename))
        return str(cache_file)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_hub_download)
    return calls


def saved_in_hub_cache(tmp_path, file_name: str, state_dict: dict):
    """state_dict saved as tmp_path/hub-cache/<file_name> (a stand-in hub cache); returns the path."""
    cache_file = tmp_path / "hub-cache" / file_name
    cache_file.parent.mkdir(exist_ok=True)
    torch.save(state_dict, cache_file)
    return cache_file


def random_sit(seed: int = 0, **overrides) -> models.SiT:
    config = dict(TINY, **overrides)
    torch.manual_seed(seed)
    model = models.SiT(**config)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.1)
    return model.eval()


def assert_same_weights(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for key in expected:
        assert torch.equal(actual[key], expected[key]), key


def train_args(**overrides) -> argparse.Namespace:
    args = dict(model="SiT-XL/2", image_size=64, vae="ema", num_classes=10, path_type="GVP", prediction="noise",
                loss_weight="velocity", train_eps=1e-5, sample_eps=1e-3, results_dir="results", global_seed=0)
    args.update(overrides)
    return argparse.Namespace(**args)


def train_checkpoint(model: models.SiT, ema: models.SiT, **extra) -> dict:
    """The reference format: {"model", "ema", "opt", "args"} with state dicts and a Namespace."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model(torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([1, 2])).sum().backward()
    opt.step()
    checkpoint = {"model": model.state_dict(), "ema": ema.state_dict(), "opt": opt.state_dict(), "args": train_args()}
    checkpoint.update(extra)
    return checkpoint


#################################################################################
#                                 Safe loading                                  #
#################################################################################

def test_bare_state_dict_round_trip(tmp_path):
    state_dict = random_sit().state_dict()
    torch.save(state_dict, tmp_path / "bare.pt")
    assert_same_weights(find_model(str(tmp_path / "bare.pt")), state_dict)


def test_train_checkpoint_yields_ema_weights(tmp_path):
    model, ema = random_sit(seed=0), random_sit(seed=1)
    torch.save(train_checkpoint(model, ema), tmp_path / "0001000.pt")
    loaded = find_model(str(tmp_path / "0001000.pt"))
    assert_same_weights(loaded, ema.state_dict())
    assert not torch.equal(loaded["final_layer.linear.weight"], model.state_dict()["final_layer.linear.weight"])


def test_checkpoint_without_ema_yields_model_weights(tmp_path):
    model = random_sit()
    torch.save({"model": model.state_dict(), "args": train_args()}, tmp_path / "noema.pt")
    assert_same_weights(find_model(str(tmp_path / "noema.pt")), model.state_dict())


def test_namespace_checkpoint_loads_with_its_args(tmp_path):
    model, ema = random_sit(seed=0), random_sit(seed=1)
    saved = train_checkpoint(model, ema, steps=1000)
    torch.save(saved, tmp_path / "ckpt.pt")
    raw = load_checkpoint(str(tmp_path / "ckpt.pt"))
    assert set(raw) == {"model", "ema", "opt", "args", "steps"}
    assert isinstance(raw["args"], argparse.Namespace)
    assert raw["args"] == train_args()
    assert raw["steps"] == 1000
    assert raw["opt"]["param_groups"][0]["lr"] == 1e-4
    for key, state in saved["opt"]["state"].items():
        assert torch.equal(raw["opt"]["state"][key]["exp_avg"], state["exp_avg"])


def test_legacy_serialization_loads(tmp_path):
    state_dict = random_sit().state_dict()
    torch.save(state_dict, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert_same_weights(find_model(str(tmp_path / "legacy.pt")), state_dict)


@pytest.mark.parametrize("where", ["top", "inside_args"])
def test_malicious_pickle_is_refused_and_does_not_run(tmp_path, where):
    marker = tmp_path / "pwned"
    payload = MakesMarker(str(marker))
    if where == "top":
        evil = {"model": random_sit().state_dict(), "hook": payload}
    else:
        evil = {"ema": random_sit().state_dict(), "args": argparse.Namespace(model="SiT-XL/2", hook=payload)}
    torch.save(evil, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match=r"refused to load .*evil\.pt.*GLOBAL .*mkdir"):
        find_model(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="refused"):
        load_model(str(tmp_path / "evil.pt"))
    assert not marker.exists()
    # control: the payload is real, a plain unpickler does run it
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.is_dir()


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"no SiT checkpoint at .*nowhere\.pt"):
        find_model(str(tmp_path / "nowhere.pt"))


def test_folder_is_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder"):
        find_model(str(tmp_path))


def test_empty_file(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="is empty"):
        find_model(str(tmp_path / "empty.pt"))


def test_text_file(tmp_path):
    (tmp_path / "notes.pt").write_text("these are my notes, not a checkpoint\n")
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        find_model(str(tmp_path / "notes.pt"))


@pytest.mark.parametrize("zip_format", [True, False])
def test_truncated_file(tmp_path, zip_format):
    torch.save(random_sit().state_dict(), tmp_path / "full.pt", _use_new_zipfile_serialization=zip_format)
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="not a readable PyTorch checkpoint"):
        find_model(str(tmp_path / "cut.pt"))


def test_not_a_dict(tmp_path):
    torch.save(torch.ones(3), tmp_path / "tensor.pt")
    with pytest.raises(CheckpointError, match="holds a Tensor, not a checkpoint dict"):
        find_model(str(tmp_path / "tensor.pt"))


def test_checkpoint_error_is_a_value_error():
    assert issubclass(CheckpointError, ValueError)


#################################################################################
#                           Downloads (local server only)                       #
#################################################################################

class FileServer:
    """A tiny http server on 127.0.0.1: `files` maps a path to bytes; paths in `short` announce the
    full length but send only half before closing (an interrupted transfer)."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.short: set[str] = set()
        self.hits: list[str] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                path = self.path.split("?")[0]
                server.hits.append(path)
                if path not in server.files:
                    self.send_error(404)
                    return
                data = server.files[path]
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data[: len(data) // 2] if path in server.short else data)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    file_server = FileServer()
    yield file_server
    file_server.close()


@pytest.fixture
def closed_port():
    """A local port nothing listens on: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def saved_bytes(obj, tmp_path) -> bytes:
    torch.save(obj, tmp_path / "payload.pt")
    return (tmp_path / "payload.pt").read_bytes()


def leftovers(folder) -> list:
    return sorted(os.listdir(folder)) if os.path.isdir(folder) else []


def test_http_download_into_pretrained_models(server, tmp_path):
    ema = random_sit(seed=3)
    server.files["/ckpts/my-sit.pt"] = saved_bytes(train_checkpoint(random_sit(), ema), tmp_path)
    loaded = find_model(server.url("/ckpts/my-sit.pt"))
    assert_same_weights(loaded, ema.state_dict())
    cached = download.url_cache_name(server.url("/ckpts/my-sit.pt"))
    assert leftovers("pretrained_models") == [cached] and cached.endswith("-my-sit.pt") and len(cached) == 8 + 10
    assert (tmp_path / "pretrained_models" / cached).read_bytes() == server.files["/ckpts/my-sit.pt"]
    # a second call reuses the complete file: no new request
    find_model(server.url("/ckpts/my-sit.pt"))
    assert server.hits == ["/ckpts/my-sit.pt"]


def test_file_url_download(tmp_path):
    state_dict = random_sit().state_dict()
    source = tmp_path / "elsewhere" / "weights file.pt"
    source.parent.mkdir()
    torch.save(state_dict, source)
    assert_same_weights(find_model(source.as_uri()), state_dict)
    assert leftovers("pretrained_models") == [download.url_cache_name(source.as_uri())]
    assert leftovers("pretrained_models")[0].endswith("-weights file.pt")


def test_two_runs_checkpoints_of_the_same_name_are_cached_apart(server, tmp_path):
    """runA/0400000.pt then runB/0400000.pt: each URL gets its own weights, not the first one's cache."""
    run_a, run_b = random_sit(seed=1).state_dict(), random_sit(seed=2).state_dict()
    server.files["/runA/0400000.pt"] = saved_bytes(run_a, tmp_path)
    server.files["/runB/0400000.pt"] = saved_bytes(run_b, tmp_path)
    assert_same_weights(find_model(server.url("/runA/0400000.pt")), run_a)
    assert_same_weights(find_model(server.url("/runB/0400000.pt")), run_b)
    assert_same_weights(find_model(server.url("/runA/0400000.pt")), run_a)  # from its cache
    assert server.hits == ["/runA/0400000.pt", "/runB/0400000.pt"]
    assert len(leftovers("pretrained_models")) == 2


def test_interrupted_download_leaves_no_file(server, tmp_path):
    server.files["/cut.pt"] = saved_bytes(random_sit().state_dict(), tmp_path)
    server.short.add("/cut.pt")
    with pytest.raises(CheckpointError, match=r"(interrupted|IncompleteRead).*--ckpt /path/to/cut\.pt"):
        find_model(server.url("/cut.pt"))
    assert leftovers("pretrained_models") == []  # neither the final name nor a partial temp file


def test_download_url_interrupted_by_ctrl_c_leaves_no_file(server, tmp_path, monkeypatch):
    server.files["/big.pt"] = b"x" * (3 * 1024)
    import sit.hub
    from tqdm import tqdm

    monkeypatch.setattr(sit.hub, "CHUNK_BYTES", 1024)  # download.py streams through sit.hub.url_download
    original_write = tqdm.update
    calls = []

    def interrupt_on_second_chunk(bar, n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return original_write(bar, n)

    monkeypatch.setattr(tqdm, "update", interrupt_on_second_chunk)
    with pytest.raises(KeyboardInterrupt):
        download.download_url(server.url("/big.pt"), "pretrained_models/big.pt")
    assert leftovers("pretrained_models") == []


def test_http_404_is_a_clear_error(server):
    with pytest.raises(CheckpointError, match=r"could not download .*HTTPError.*404.*--ckpt /path/to/gone\.pt"):
        find_model(server.url("/gone.pt"))
    assert leftovers("pretrained_models") == []


def test_connection_refused_says_pass_a_local_file(closed_port):
    url = f"http://127.0.0.1:{closed_port}/SiT-XL-2-256.pt"
    with pytest.raises(CheckpointError) as raised:
        find_model(url)
    message = str(raised.value)
    assert "could not download" in message and "URLError" in message
    assert message.endswith("pass the local file instead: --ckpt /path/to/SiT-XL-2-256.pt")
    assert "\n" not in message
    assert leftovers("pretrained_models") == []


def test_published_sources_hub_first_then_dropbox():
    sources = download.PUBLISHED_MODELS["SiT-XL-2-256x256.pt"]
    assert sources[0] == "hf://nyu-visionx/SiT-collections/SiT-XL-2-256.pt"
    assert sources[1].startswith("https://www.dl.dropboxusercontent.com/scl/fi/as9oeomcbub47de5g4be0/SiT-XL-2-256.pt?")
    assert download.pretrained_models == {"SiT-XL-2-256x256.pt", "SiT-XL-2-512x512.pt", "SiT-L-2-256.pt",
                                          "SiT-B-2-256.pt", "SiT-S-2-256.pt"}


def test_published_model_falls_back_to_url_when_hub_is_offline(server, tmp_path, offline_hub, monkeypatch):
    state_dict = random_sit().state_dict()
    server.files["/SiT-XL-2-256.pt"] = saved_bytes(state_dict, tmp_path)
    hub_source = download.PUBLISHED_MODELS["SiT-XL-2-256x256.pt"][0]
    monkeypatch.setitem(download.PUBLISHED_MODELS, "SiT-XL-2-256x256.pt", [hub_source, server.url("/SiT-XL-2-256.pt")])
    assert_same_weights(find_model("SiT-XL-2-256x256.pt"), state_dict)
    assert offline_hub == [("nyu-visionx/SiT-collections", "SiT-XL-2-256.pt")]  # the hub was tried first
    assert leftovers("pretrained_models") == ["SiT-XL-2-256x256.pt"]
    # once there, it is not fetched again
    find_model("SiT-XL-2-256x256.pt")
    assert server.hits == ["/SiT-XL-2-256.pt"] and len(offline_hub) == 1


def test_published_model_from_hub(server, tmp_path, monkeypatch):
    state_dict = random_sit().state_dict()
    cache_file = saved_in_hub_cache(tmp_path, "SiT-XL-2-256.pt", state_dict)
    calls = hub_stand_in(monkeypatch, cache_file)
    hub_source = download.PUBLISHED_MODELS["SiT-XL-2-256x256.pt"][0]
    monkeypatch.setitem(download.PUBLISHED_MODELS, "SiT-XL-2-256x256.pt", [hub_source, server.url("/SiT-XL-2-256.pt")])
    assert_same_weights(find_model("SiT-XL-2-256x256.pt"), state_dict)
    assert calls == [("nyu-visionx/SiT-collections", "SiT-XL-2-256.pt")]
    assert server.hits == []  # the fallback was not needed
    assert (tmp_path / "pretrained_models" / "SiT-XL-2-256x256.pt").read_bytes() == cache_file.read_bytes()


def test_published_model_all_sources_fail(offline_hub, closed_port, monkeypatch):
    hub_source = download.PUBLISHED_MODELS["SiT-XL-2-256x256.pt"][0]
    dead_url = f"http://127.0.0.1:{closed_port}/SiT-XL-2-256.pt"
    monkeypatch.setitem(download.PUBLISHED_MODELS, "SiT-XL-2-256x256.pt", [hub_source, dead_url])
    with pytest.raises(CheckpointError) as raised:
        find_model("SiT-XL-2-256x256.pt")
    message = str(raised.value)
    assert "Hugging Face hub" in message and dead_url in message
    assert message.endswith("--ckpt /path/to/SiT-XL-2-256x256.pt")
    assert leftovers("pretrained_models") == []


def test_published_model_already_downloaded_needs_no_network(offline_hub, tmp_path):
    state_dict = random_sit().state_dict()
    os.makedirs("pretrained_models")
    torch.save(state_dict, "pretrained_models/SiT-XL-2-256x256.pt")
    assert_same_weights(find_model("SiT-XL-2-256x256.pt"), state_dict)
    assert offline_hub == []


def test_hub_file_spec(tmp_path, monkeypatch):
    state_dict = random_sit().state_dict()
    calls = hub_stand_in(monkeypatch, saved_in_hub_cache(tmp_path, "cached.pt", state_dict))
    assert_same_weights(find_model("hf://nyu-visionx/SiT-collections/sub/dir/SiT-B-2-256.pt"), state_dict)
    assert calls == [("nyu-visionx/SiT-collections", "sub/dir/SiT-B-2-256.pt")]
    assert leftovers("pretrained_models") == []  # hub files stay in the hub's cache


def test_hub_file_offline(offline_hub):
    with pytest.raises(CheckpointError, match=r"could not fetch hf://org/repo/x\.pt .*--ckpt /path/to/x\.pt$"):
        find_model("hf://org/repo/x.pt")


def test_local_copy_finds_each_sources_fetched_file_without_fetching(server, tmp_path, offline_hub, monkeypatch):
    """download.local_copy: what the record beside a sample batch hashes; it never downloads."""
    assert download.local_copy("SiT-XL-2-256x256.pt") is None  # not fetched yet
    os.makedirs("pretrained_models")
    torch.save(random_sit().state_dict(), "pretrained_models/SiT-XL-2-256x256.pt")
    assert download.local_copy("SiT-XL-2-256x256.pt") == str(tmp_path / "pretrained_models" / "SiT-XL-2-256x256.pt")
    url = server.url("/ckpts/my-sit.pt")
    assert download.local_copy(url) is None and server.hits == []
    server.files["/ckpts/my-sit.pt"] = saved_bytes(random_sit().state_dict(), tmp_path)
    find_model(url)
    assert download.local_copy(url) == str(tmp_path / "pretrained_models" / download.url_cache_name(url))
    cached = saved_in_hub_cache(tmp_path, "SiT-B-2-256.pt", random_sit().state_dict())
    asked = []
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache",
                        lambda repo_id, filename: asked.append((repo_id, filename)) or str(cached))
    assert download.local_copy("hf://nyu-visionx/SiT-collections/SiT-B-2-256.pt") == str(cached)
    assert asked == [("nyu-visionx/SiT-collections", "SiT-B-2-256.pt")]
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda repo_id, filename: None)
    assert download.local_copy("hf://nyu-visionx/SiT-collections/SiT-L-2-256.pt") is None
    assert download.local_copy("pretrained_models/SiT-XL-2-256x256.pt") == \
        str(tmp_path / "pretrained_models" / "SiT-XL-2-256x256.pt")  # a path: itself, made absolute
    assert download.local_copy(tmp_path / "missing.pt") is None and download.local_copy(tmp_path) is None
    assert offline_hub == [] and server.hits == ["/ckpts/my-sit.pt"]


@pytest.mark.parametrize("spec", ["hf://org", "hf://org/repo", "hf://org//x.pt"])
def test_bad_hub_spec(spec):
    with pytest.raises(CheckpointError, match="expected hf://<org>/<repo>/<file>"):
        find_model(spec)


#################################################################################
#                             Model from checkpoint                             #
#################################################################################

def model_output(model: models.SiT) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    channels, size = model.in_channels, model.x_embedder.grid_size * model.patch_size
    x = torch.randn(2, channels, size, size, generator=generator)
    with torch.no_grad():
        return model(x, torch.tensor([0.25, 0.75]), torch.tensor([1, 3]))


def test_load_model_from_train_checkpoint(tmp_path):
    model, ema = random_sit(seed=0), random_sit(seed=1)
    torch.save(train_checkpoint(model, ema), tmp_path / "ckpt.pt")
    loaded, info = load_model(str(tmp_path / "ckpt.pt"))
    assert not loaded.training
    assert loaded.config == dict(ema.config, num_heads=1)  # read from shapes: head size 64 assumed
    assert_same_weights(loaded.state_dict(), ema.state_dict())
    assert info == {"model_name": None, "image_size": 64, "num_classes": 10, "in_channels": 4, "pixel_space": False, "vae": "ema",
                    "transport": {"path_type": "GVP", "prediction": "noise", "loss_weight": "velocity",
                                  "train_eps": 1e-5, "sample_eps": 1e-3}, "latent_statistics": None}
    # the flags that agree with the checkpoint are accepted
    load_model(str(tmp_path / "ckpt.pt"), image_size=64, num_classes=10)


def test_load_model_from_bare_state_dict(tmp_path):
    original = random_sit(learn_sigma=False, num_classes=5)
    torch.save(original.state_dict(), tmp_path / "bare.pt")
    loaded, info = load_model(str(tmp_path / "bare.pt"))
    assert loaded.learn_sigma is False
    assert info == {"model_name": None, "image_size": 64, "num_classes": 5, "in_channels": 4, "pixel_space": False, "vae": None,
                    "transport": None, "latent_statistics": None}
    # the weights are the same; the head count (not in the shapes) is guessed, see the next test
    assert_same_weights(loaded.state_dict(), original.state_dict())


def test_load_model_uses_stored_model_config(tmp_path):
    model, ema = random_sit(seed=0), random_sit(seed=1)
    torch.save(train_checkpoint(model, ema, model_config=ema.config), tmp_path / "ckpt.pt")
    loaded, info = load_model(str(tmp_path / "ckpt.pt"))
    assert loaded.config == ema.config  # num_heads 2 kept, not guessed
    torch.testing.assert_close(model_output(loaded), model_output(ema), rtol=0, atol=0)
    assert info["image_size"] == 64 and info["num_classes"] == 10


def test_load_model_stored_config_inconsistent_with_weights(tmp_path):
    ema = random_sit()
    torch.save({"ema": ema.state_dict(), "model_config": dict(ema.config, depth=3)}, tmp_path / "ckpt.pt")
    with pytest.raises(CheckpointError, match="do not fit the model they describe"):
        load_model(str(tmp_path / "ckpt.pt"))


@pytest.mark.parametrize("in_channels,vae,expected_size", [(3, None, 8), (3, "none", 8), (4, "none", 8), (4, "mse", 64)])
def test_load_model_image_size_latent_or_pixel(tmp_path, in_channels, vae, expected_size):
    ema = random_sit(in_channels=in_channels)
    checkpoint = {"ema": ema.state_dict()}
    if vae is not None:
        checkpoint["args"] = train_args(vae=vae)
    torch.save(checkpoint, tmp_path / "ckpt.pt")
    _, info = load_model(str(tmp_path / "ckpt.pt"))
    assert info["image_size"] == expected_size
    assert info["in_channels"] == in_channels
    assert info["vae"] == vae


def test_load_model_args_without_transport_settings(tmp_path):
    ema = random_sit()
    args = argparse.Namespace(model="SiT-XL/2", vae="mse", prediction="score")
    torch.save({"ema": ema.state_dict(), "args": args}, tmp_path / "ckpt.pt")
    _, info = load_model(str(tmp_path / "ckpt.pt"))
    assert info["transport"] == {"prediction": "score"}  # only what the args hold
    torch.save({"ema": ema.state_dict(), "args": argparse.Namespace(vae="mse")}, tmp_path / "ckpt.pt")
    _, info = load_model(str(tmp_path / "ckpt.pt"))
    assert info["transport"] is None and info["vae"] == "mse"


def test_load_model_rejects_non_sit_weights(tmp_path):
    torch.save({"ema": {"weight": torch.zeros(3)}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="does not hold SiT weights"):
        load_model(str(tmp_path / "other.pt"))


@pytest.fixture
def tiny_checkpoint(tmp_path):
    path = tmp_path / "tiny.pt"
    torch.save(train_checkpoint(random_sit(), random_sit(seed=1)), path)
    return str(path)


def test_mismatch_model_name_custom(tiny_checkpoint):
    with pytest.raises(CheckpointError) as raised:
        load_model(tiny_checkpoint, model_name="SiT-B/2")
    assert_names(raised.value, "--model SiT-B/2", "custom")


def test_unknown_model_name(tiny_checkpoint):
    with pytest.raises(CheckpointError, match=r"--model 'SiT-M/2'.*SiT-S/8"):
        load_model(tiny_checkpoint, model_name="SiT-M/2")


def test_mismatch_image_size(tiny_checkpoint):
    with pytest.raises(CheckpointError) as raised:
        load_model(tiny_checkpoint, image_size=256)
    assert_names(raised.value, "--image-size 256", "64")


def test_mismatch_num_classes(tiny_checkpoint):
    with pytest.raises(CheckpointError) as raised:
        load_model(tiny_checkpoint, num_classes=1000)
    assert_names(raised.value, "--num-classes 1000", "10")


@pytest.fixture(scope="module")
def published_shape_checkpoint(tmp_path_factory):
    """A SiT-S/8 at 64x64 (input 8): the smallest published shape, stored in half precision."""
    torch.manual_seed(0)
    model = models.SiT_models["SiT-S/8"](input_size=8, num_classes=10)
    path = tmp_path_factory.mktemp("s8") / "sit-s8.pt"
    torch.save({key: value.half() for key, value in model.state_dict().items()}, path)
    return str(path)


def test_published_shape_is_named(published_shape_checkpoint):
    loaded, info = load_model(published_shape_checkpoint, model_name="SiT-S/8", image_size=64, num_classes=10)
    assert info["model_name"] == "SiT-S/8"
    assert loaded.config == models.SiT_models["SiT-S/8"](input_size=8, num_classes=10).config


@pytest.mark.parametrize("requested", ["SiT-S/4", "SiT-B/8", "SiT-XL/2"])
def test_mismatch_model_name_published(published_shape_checkpoint, requested):
    with pytest.raises(CheckpointError) as raised:
        load_model(published_shape_checkpoint, model_name=requested)
    assert_names(raised.value, f"--model {requested}", "SiT-S/8")


def test_load_model_default_is_the_published_model(offline_hub):
    """ckpt=None means SiT-XL-2-256x256.pt (here a tiny stand-in already in pretrained_models/)."""
    ema = random_sit()
    os.makedirs("pretrained_models")
    torch.save(ema.state_dict(), "pretrained_models/SiT-XL-2-256x256.pt")
    loaded, info = load_model(None)
    assert_same_weights(loaded.state_dict(), ema.state_dict())
    assert offline_hub == []
    with pytest.raises(CheckpointError, match="--image-size 256 but the checkpoint was trained at 64"):
        load_model(None, image_size=256)


def test_no_ckpt_picks_the_published_model_of_the_image_size_or_refuses_before_downloading(monkeypatch):
    requested = []

    def record(source):
        requested.append(source)
        raise download.CheckpointError("stop here")

    monkeypatch.setattr(download, "load_checkpoint", record)
    for image_size, name in ((None, "SiT-XL-2-256x256.pt"), (256, "SiT-XL-2-256x256.pt"), (512, "SiT-XL-2-512x512.pt")):
        with pytest.raises(download.CheckpointError, match="stop here"):
            load_model(None, model_name="SiT-XL/2", image_size=image_size)
        assert requested.pop() == name
    for kwargs, message in ((dict(model_name="SiT-B/4"), "no published checkpoint of --model SiT-B/4"),
                            (dict(image_size=384), "no published model at --image-size 384"),
                            (dict(num_classes=10), "1000 classes")):
        with pytest.raises(download.CheckpointError, match=message):
            load_model(None, **kwargs)
    assert requested == []  # refused before any download
    assert download.PUBLISHED_MODELS["SiT-XL-2-512x512.pt"][0].startswith("hf://nyu-visionx/SiT-collections/")


@pytest.mark.parametrize("model_name,name", [("SiT-L/2", "SiT-L-2-256.pt"), ("SiT-B/2", "SiT-B-2-256.pt"),
                                             ("SiT-S/2", "SiT-S-2-256.pt")])
def test_no_ckpt_picks_the_published_s_b_l_checkpoint_of_the_model(model_name, name, monkeypatch):
    requested = []

    def record(source):
        requested.append(source)
        raise download.CheckpointError("stop here")

    monkeypatch.setattr(download, "load_checkpoint", record)
    for image_size in (None, 256):
        with pytest.raises(download.CheckpointError, match="stop here"):
            load_model(None, model_name=model_name, image_size=image_size)
        assert requested.pop() == name
    assert download.PUBLISHED_MODELS[name] == [f"hf://nyu-visionx/SiT-collections/{name}"]
    with pytest.raises(download.CheckpointError) as raised:
        load_model(None, model_name=model_name, image_size=512)
    assert_names(raised.value, "--image-size 512", "--ckpt", "published")
    with pytest.raises(download.CheckpointError) as raised:
        load_model(None, model_name="SiT-S/4")
    assert_names(raised.value, "--model SiT-S/4", "--ckpt", "published")
    assert requested == []  # refused before any download


def test_published_s_b_l_checkpoint_is_fetched_from_the_hub_into_pretrained_models(tmp_path, monkeypatch):
    """SiT-B/2 without --ckpt: the hub file SiT-B-2-256.pt (here a tiny stand-in in a fake hub cache)."""
    state_dict = random_sit().state_dict()
    cache_file = saved_in_hub_cache(tmp_path, "SiT-B-2-256.pt", state_dict)
    calls = hub_stand_in(monkeypatch, cache_file)
    with pytest.raises(CheckpointError, match="--model SiT-B/2 but the checkpoint holds a custom SiT"):
        load_model(None, model_name="SiT-B/2")  # the stand-in is no SiT-B/2: fetched, then refused
    assert calls == [("nyu-visionx/SiT-collections", "SiT-B-2-256.pt")]
    assert (tmp_path / "pretrained_models" / "SiT-B-2-256.pt").read_bytes() == cache_file.read_bytes()
    assert_same_weights(find_model("SiT-B-2-256.pt"), state_dict)
    assert len(calls) == 1  # already in pretrained_models/
