"""sit.hub: hub files from the cache first; a file that is not cached is fetched only after one request
(no retries) reached the hub, so an offline or failing hub ends the main command in one line, not in
minutes of retries. download.py (the published checkpoint) and sit.latents (the SD VAE) fetch through it."""
import argparse
import http.server
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch

from conftest import REPO, assert_names
from models import SiT

COMMIT = "0123456789abcdef0123456789abcdef01234567"


class CountingHub(http.server.BaseHTTPRequestHandler):
    """A hub that answers every request with 503 (which huggingface_hub retries with backoff); counts them."""
    requests: list = []

    def answer(self):
        CountingHub.requests.append(f"{self.command} {self.path}")
        self.send_response(503)
        self.send_header("Content-Length", "0")
        self.end_headers()

    do_GET = do_HEAD = answer

    def log_message(self, *args):
        pass


@pytest.fixture
def failing_hub():
    """(endpoint URL, list of requests received) of a local hub that fails every request."""
    CountingHub.requests = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), CountingHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", CountingHub.requests
    server.shutdown()
    server.server_close()


def file_requests(requests: list) -> list:
    """The requests for files (huggingface_hub may also ask its API about other things)."""
    return [request for request in requests if "/resolve/" in request]


def run_offline(args, cwd, endpoint, **env):
    """A script run with an empty hub cache, the hub at `endpoint`, and every other URL behind a dead proxy
    (so that the Dropbox fallback fails at once instead of downloading)."""
    environ = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "1", "HF_HOME": str(cwd / "hf_home"),
               "HF_ENDPOINT": endpoint, "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9",
               "https_proxy": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9",
               "NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost", **env}
    if "HF_HUB_OFFLINE" not in env:  # the test suite may run offline; these runs must reach the local hub
        environ.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([sys.executable, os.path.join(REPO, args[0]), *args[1:]], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_main_command_offline_fails_in_one_line_after_one_request(tmp_path, failing_hub):
    endpoint, requests = failing_hub
    result = run_offline(["sample.py", "ODE", "--image-size", "256", "--seed", "1"], tmp_path, endpoint)
    assert result.returncode == 2
    assert "Retrying" not in result.stdout + result.stderr
    line = assert_names(result.stderr, f"{endpoint}/nyu-visionx/SiT-collections/resolve/main/SiT-XL-2-256.pt", "--ckpt")
    assert line.startswith("sample.py: error: "), line
    assert file_requests(requests) == ["HEAD /nyu-visionx/SiT-collections/resolve/main/SiT-XL-2-256.pt"]  # no retry
    assert not os.path.exists(tmp_path / "pretrained_models" / "SiT-XL-2-256x256.pt")


@pytest.mark.slow
def test_hub_offline_mode_makes_no_request_and_says_so(tmp_path, failing_hub):
    endpoint, requests = failing_hub
    result = run_offline(["sample.py", "ODE", "--image-size", "256", "--seed", "1"], tmp_path, endpoint,
                         HF_HUB_OFFLINE="1")
    assert result.returncode == 2
    line = assert_names(result.stderr, "SiT-XL-2-256.pt", "HF_HUB_OFFLINE", "not tried")  # nor the Dropbox fallback
    assert line.startswith("sample.py: error: "), line
    assert requests == []


@pytest.mark.slow
def test_the_vae_download_fails_in_one_line_after_one_request(tmp_path, failing_hub):
    endpoint, requests = failing_hub
    torch.manual_seed(0)
    model = SiT(input_size=4, patch_size=2, hidden_size=32, depth=1, num_heads=2, num_classes=10)
    args = argparse.Namespace(model="SiT-S/2", image_size=32, num_classes=10, vae="ema", path_type="Linear",
                              prediction="velocity", loss_weight=None, train_eps=None, sample_eps=None)
    torch.save({"model": model.state_dict(), "ema": model.state_dict(), "opt": {}, "args": args,
                "model_config": model.config, "train_steps": 1}, tmp_path / "model.pt")
    result = run_offline(["sample.py", "ODE", "--ckpt", str(tmp_path / "model.pt"), "--class-labels", "1"], tmp_path,
                         endpoint)
    assert result.returncode == 2
    line = assert_names(result.stderr, f"{endpoint}/stabilityai/sd-vae-ft-mse/resolve/main/config.json", "--vae")
    assert line.startswith("sample.py: error: "), line
    assert file_requests(requests) == ["HEAD /stabilityai/sd-vae-ft-mse/resolve/main/config.json"]
    assert "Retrying" not in result.stdout + result.stderr


def test_a_cached_hub_vae_loads_without_any_request(tmp_path, tiny_vae, monkeypatch):
    """The hub's layout (refs/main -> snapshots/<commit>/<file>) with the tiny VAE in it: loaded from the
    cache, the endpoint (a dead port) never asked."""
    from huggingface_hub import constants

    from sit.hub import hub_folder
    from sit.latents import VAE_HUB_FILES, load_latent_space

    repo = tmp_path / "hub" / "models--stabilityai--sd-vae-ft-ema"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    for name in VAE_HUB_FILES:
        shutil.copyfile(os.path.join(tiny_vae, name), snapshot / name)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    assert hub_folder("stabilityai/sd-vae-ft-ema", VAE_HUB_FILES) == str(snapshot)
    vae = load_latent_space("ema", torch.device("cpu")).network
    assert list(vae.config.block_out_channels) == [8, 8, 8, 8]  # the tiny VAE, not SD's
    assert not any(parameter.requires_grad for parameter in vae.parameters())
