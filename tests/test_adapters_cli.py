"""sample.py --embedding PATH[:TOKEN] and --ip-adapter FILE --ip-image IMG [--ip-scale S]: what reaches the
pipeline, the metadata, and bad input as one line before any model loads."""

import pytest
from PIL import Image
from skimage import data

from sd_jax import hashing
from sd_jax.cli.sample import main
from sd_jax.infotext import parse_infotext
from sd_jax.pipelines.pipeline import StableDiffusion
from sd_jax.pnginfo import read_parameters


def meta(path):
    return parse_infotext(read_parameters(path))


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    p = tmp_path_factory.mktemp("ip") / "photo.png"
    Image.fromarray(data.astronaut()).resize((64, 64), Image.LANCZOS).save(p)
    return p


def test_embedding_and_ip_adapter_reach_the_pipeline(fixtures_dir, photo, tmp_path, monkeypatch):
    calls = []
    real = StableDiffusion.txt2img

    def spy(self, *a, **kw):
        calls.append((self, kw))
        return real(self, *a, **kw)

    monkeypatch.setattr(StableDiffusion, "txt2img", spy)
    emb = fixtures_dir / "embeddings" / "sd1_emb.safetensors"
    ip = fixtures_dir / "ip_adapter" / "models" / "ip-adapter_sd15.safetensors"
    main(["--model", str(fixtures_dir / "sd1"), "--prompt", "a photo of <cat-toy>", "--steps", "2",
          "--output-dir", str(tmp_path), "--embedding", f"{emb}:<cat-toy>", "--ip-adapter", str(ip),
          "--ip-image", str(photo), "--ip-scale", "0.5"])  # fmt: skip
    ((pipe, kw),) = calls
    assert kw["ip_adapter_image"].shape == (64, 64, 3) and pipe.ip_adapter.scales == [0.5]
    tok = pipe.components.tokenizers[0]
    assert "<cat-toy>" in tok.added_tokens_encoder  # the embedding's token was added
    m = meta(next(tmp_path.glob("00000-0.png")))
    assert m["TI hashes"] == f"<cat-toy>: {hashing.file_sha256(emb)[:12]}" and m["IP-Adapter scale"] == "0.5"
    assert m["IP-Adapter"] == f"ip-adapter_sd15 [{hashing.file_sha256(ip)[:8]}]"


@pytest.mark.parametrize(("args", "words"), [
    (["--ip-adapter", "IP"], "--ip-adapter needs --ip-image"),
    (["--ip-image", "PHOTO"], "--ip-image needs --ip-adapter"),
    (["--ip-adapter", "nope.safetensors", "--ip-image", "PHOTO"], "--ip-adapter nope.safetensors: no such file"),
    (["--embedding", "nope.pt:tok"], "--embedding nope.pt:tok: no such file"),
])  # fmt: skip
def test_bad_flags_are_one_line_usage_errors(fixtures_dir, photo, tmp_path, capsys, args, words):
    ip = fixtures_dir / "ip_adapter" / "models" / "ip-adapter_sd15.safetensors"
    args = [{"IP": str(ip), "PHOTO": str(photo)}.get(a, a) for a in args]
    with pytest.raises(SystemExit) as e:
        main(["--model", str(fixtures_dir / "sd1"), "--prompt", "x", "--output-dir", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.png"))
