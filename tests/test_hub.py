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


#################################################################################
#        Every download through the one bounded fetch, in this process          #
#################################################################################

def hub_at(monkeypatch, tmp_path, endpoint: str) -> None:
    """huggingface_hub with an empty cache under tmp_path, the hub at `endpoint`, HF_HUB_OFFLINE unset (the
    suite may run with it set), and torch hub's folder under tmp_path, empty."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    # (read from HF_ENDPOINT at import, as ENDPOINT: hf_hub_url builds file URLs from it)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", endpoint + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "torch_hub"))


def only_line(raised: BaseException, output: str, elapsed: float) -> str:
    """The error's one line, after the call printed or logged no retry and took a few seconds at most."""
    assert "Retrying" not in output and "retry" not in output.lower(), output[-2000:]
    assert elapsed < 8, elapsed
    message = str(raised)
    assert "\n" not in message, message
    return message


def test_plain_urls_are_fetched_in_one_request_or_not_at_all_offline(tmp_path, failing_hub, monkeypatch, capfd,
                                                                       caplog):
    import time

    from huggingface_hub import constants

    from sit.hub import HubUnavailable, url_file

    endpoint, requests = failing_hub
    hub_at(monkeypatch, tmp_path, endpoint)
    url, path = f"{endpoint}/files/weights.pth", str(tmp_path / "cache" / "weights.pth")
    start = time.monotonic()
    with pytest.raises(HubUnavailable) as raised:
        url_file(url, path, progress=False)
    line = only_line(raised.value, capfd.readouterr().err + caplog.text, time.monotonic() - start)
    assert url in line and "503" in line
    assert requests == ["GET /files/weights.pth"] and not os.path.exists(path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubUnavailable) as raised:
        url_file(url, path, progress=False)
    assert_names(raised.value, path, "HF_HUB_OFFLINE", url)
    assert requests == ["GET /files/weights.pth"]  # nothing more asked
    with open(path, "wb") as handle:
        handle.write(b"weights")
    assert url_file(url, path) == path  # a file already there needs no request, offline or not


def test_the_inception_download_is_one_request_and_one_line_saying_where_to_put_it(tmp_path, failing_hub,
                                                                                   monkeypatch, capfd, caplog):
    import time

    from huggingface_hub import constants

    import sit.metrics.inception_weights as inception_weights
    from sit.metrics.errors import InceptionWeightsError

    endpoint, requests = failing_hub
    hub_at(monkeypatch, tmp_path, endpoint)
    url = f"{endpoint}/toshas/weights-inception-2015-12-05-6726825d.pth"
    monkeypatch.setattr(inception_weights, "INCEPTION_WEIGHTS_URL", url)
    target = os.path.join(str(tmp_path / "torch_hub"), "checkpoints", "weights-inception-2015-12-05-6726825d.pth")
    start = time.monotonic()
    with pytest.raises(InceptionWeightsError) as raised:
        inception_weights.fetch_inception_weights()
    line = only_line(raised.value, capfd.readouterr().err + caplog.text, time.monotonic() - start)
    assert_names(line, url, target, "--inception-weights")
    assert requests == ["GET /toshas/weights-inception-2015-12-05-6726825d.pth"]
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # the hub's switch holds for every download
    with pytest.raises(InceptionWeightsError) as raised:
        inception_weights.fetch_inception_weights()
    assert_names(raised.value, target, "HF_HUB_OFFLINE", "--inception-weights")
    assert len(requests) == 1
