"""sit.files.folder_sha256: the hash of a folder's files (names and contents), as the sample record uses it
for a local VAE folder."""
import hashlib

from sit.files import folder_sha256, sha256_file


def test_folder_hash_is_the_hash_of_its_sorted_name_and_content_lines(tmp_path):
    (tmp_path / "vae" / "sub").mkdir(parents=True)
    (tmp_path / "vae" / "config.json").write_text('{"latent_channels": 4}')
    (tmp_path / "vae" / "sub" / "weights.bin").write_bytes(bytes(range(256)) * 3)
    folder = str(tmp_path / "vae")
    config_hash = hashlib.sha256(b'{"latent_channels": 4}').hexdigest()
    weights_hash = hashlib.sha256(bytes(range(256)) * 3).hexdigest()
    lines = f"config.json {config_hash}\nsub/weights.bin {weights_hash}\n"
    assert folder_sha256(folder) == hashlib.sha256(lines.encode()).hexdigest()
    assert sha256_file(str(tmp_path / "vae" / "config.json")) == config_hash

    first = folder_sha256(folder)
    (tmp_path / "vae" / "sub" / "weights.bin").rename(tmp_path / "vae" / "sub" / "other.bin")  # a renamed file
    renamed = folder_sha256(folder)
    (tmp_path / "vae" / "config.json").write_text('{"latent_channels": 8}')  # a changed file
    changed = folder_sha256(folder)
    (tmp_path / "vae" / "extra.txt").write_text("")  # an added file
    assert len({first, renamed, changed, folder_sha256(folder)}) == 4
