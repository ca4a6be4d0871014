"""Model, LoRA and embedding hashes (sd_jax.hashing): A1111's definitions, cached per file."""

import hashlib
import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import save_file

from sd_jax import hashing


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    path = tmp_path / "hashes.json"
    monkeypatch.setenv(hashing.CACHE_ENV, str(path))
    return path


def counting(monkeypatch):
    reads = []
    real = hashing._digest

    def digest(path, skip_header):
        reads.append(path.name)
        return real(path, skip_header)

    monkeypatch.setattr(hashing, "_digest", digest)
    return reads


def test_file_hash_is_sha256_and_cached_by_path_size_and_mtime(tmp_path, cache, monkeypatch):
    f = tmp_path / "model.safetensors"
    f.write_bytes(b"weights" * 1000)
    reads = counting(monkeypatch)
    want = hashlib.sha256(b"weights" * 1000).hexdigest()
    assert hashing.file_sha256(f) == want and hashing.model_hash(f) == want[:10]
    assert reads == ["model.safetensors"]  # the second call (model_hash) came from the cache
    entry = json.loads(cache.read_text())[f"sha256:{f.resolve()}"]
    assert entry["sha256"] == want and entry["size"] == 7000
    f.write_bytes(b"other" * 1000)
    os.utime(f, ns=(entry["mtime_ns"] + 10**9, entry["mtime_ns"] + 10**9))
    assert hashing.file_sha256(f) == hashlib.sha256(b"other" * 1000).hexdigest() and len(reads) == 2
    cache.write_text("{not json")  # a damaged cache is rebuilt
    assert hashing.file_sha256(f) == hashlib.sha256(b"other" * 1000).hexdigest() and len(reads) == 3


def test_lora_hash_is_the_addnet_hash_of_the_data_after_the_header(tmp_path):
    f = tmp_path / "add_detail.safetensors"
    save_file({"w": np.arange(12, dtype=np.float32)}, str(f), metadata={"ss_output_name": "x"})
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    want = hashlib.sha256(raw[8 + n :]).hexdigest()
    assert hashing.lora_hash(f) == want[:12] != hashlib.sha256(raw).hexdigest()[:12]
    assert hashing.embedding_hash(f) == hashlib.sha256(raw).hexdigest()[:12]  # TI: the whole file


def test_folder_hash_covers_weights_only_and_not_the_location(tmp_path, monkeypatch):
    a = tmp_path / "a"
    (a / "unet").mkdir(parents=True)
    (a / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"u" * 100)
    (a / "vae").mkdir()
    (a / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"v" * 100)
    (a / "model_index.json").write_text("{}")
    h = hashing.model_hash(a)
    lines = "".join(f"{p}/diffusion_pytorch_model.safetensors\t{hashlib.sha256(c * 100).hexdigest()}\n"
                    for p, c in (("unet", b"u"), ("vae", b"v")))  # fmt: skip
    assert h == hashlib.sha256(lines.encode()).hexdigest()[:10]
    b = tmp_path / "elsewhere" / "b"
    shutil.copytree(a, b)
    (b / "model_index.json").write_text('{"changed": 1}')
    assert hashing.model_hash(b) == h and hashing.model_name(b) == "b"
    (b / "vae" / "diffusion_pytorch_model.safetensors").write_bytes(b"w" * 100)
    assert hashing.model_hash(b) != h


def test_model_name_is_never_a_path(tmp_path):
    f = tmp_path / "v1-5-pruned.safetensors"
    f.write_bytes(b"x")
    assert hashing.model_name(f) == "v1-5-pruned" and hashing.model_name(str(tmp_path) + "/") == tmp_path.name
    assert hashing.model_name("stabilityai/sdxl-turbo") == "sdxl-turbo"
    assert hashing.model_hash("no-such/hub-id") is None  # offline, not cached: no hash, no error
