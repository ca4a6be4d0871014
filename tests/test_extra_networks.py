"""``<lora:NAME:WEIGHT>`` prompt tags (A1111's extra networks): the parser, the folder lookup, the per-batch merge
(:class:`LoraSets`), sample.py and the server. A tagged prompt gives the image of the untagged prompt with the LoRA
merged by ``--lora`` (or ``pipe.load_lora``), and the next untagged request gets the weights as loaded again."""

import base64
import io
import json

import jax
import numpy as np
import pytest
import requests
from PIL import Image
from serve_helpers import running_server

from sd_jax import extra_networks as EN
from sd_jax import hashing
from sd_jax.embedded import default_model_path
from sd_jax.infotext import parse_infotext
from sd_jax.loading.lora import save_lora
from sd_jax.models.lora import Lora, init_lora
from sd_jax.pipelines.lora_sets import LoraSets
from sd_jax.pipelines.pipeline import StableDiffusion
from sd_jax.pnginfo import read_parameters

SAMPLE = dict(seed=4, steps=3, sampler="euler", guidance_scale=7.0, height=64, width=64)


def test_tags_are_read_as_a1111_reads_them():
    text, tags = EN.parse("a cat <lora:ink:0.5>, <lora:film:0.3:0.7> sitting<lora:sub/x:te=0.2><lyco:y>")
    assert text == "a cat ,  sitting"
    assert tags == [EN.LoraTag("ink", 0.5, 0.5), EN.LoraTag("film", 0.3, 0.7), EN.LoraTag("sub/x", 0.2, 0.2),
                    EN.LoraTag("y", 1.0, 1.0)]  # fmt: skip
    assert EN.parse("<lora:a:1:unet=0.25>")[1] == [EN.LoraTag("a", 1.0, 0.25)]
    texts, batch = EN.parse_batch(["one <lora:a:0.5>", "two <lora:b>"])
    assert texts == ["one ", "two "] and batch == [EN.LoraTag("a", 0.5, 0.5)]  # the batch's: its first prompt's
    assert EN.parse("(word:1.2) [a:b:0.5] no tags") == ("(word:1.2) [a:b:0.5] no tags", [])
    for prompt, words in [("<hypernet:h:1>", "kind 'hypernet' are not supported"),
                          ("<lora:a:strong>", "weight 'strong' is not a number"),
                          ("<lora:a:1:dyn=4>", "dyn"), ("<lora:a:inf>", "not a finite number"),
                          ("<lora:a:x=1>", "unknown argument 'x'")]:  # fmt: skip
        with pytest.raises(EN.ExtraNetworkError, match=words):
            EN.parse(prompt)


def test_names_are_found_in_the_folder_only(tmp_path):
    (tmp_path / "sub").mkdir()
    for rel in ("a.safetensors", "sub/b.safetensors", "sub/a2.safetensors", "c.pt"):
        (tmp_path / rel).write_bytes(b"x")
    assert EN.find_lora("b", tmp_path) == tmp_path / "sub" / "b.safetensors"  # by stem, below the folder
    assert EN.find_lora("sub/a2", tmp_path) == tmp_path / "sub" / "a2.safetensors"  # or by its path
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "b.safetensors").write_bytes(b"x")
    with pytest.raises(EN.ExtraNetworkError, match=r"several files .*other/b, sub/b"):
        EN.find_lora("b", tmp_path)
    with pytest.raises(EN.ExtraNetworkError, match="c.pt is a pickle"):
        EN.find_lora("c", tmp_path)
    (tmp_path.parent / "outside.safetensors").write_bytes(b"x")
    with pytest.raises(EN.ExtraNetworkError, match="no ../outside.safetensors"):
        EN.find_lora("../outside", tmp_path)
    with pytest.raises(EN.ExtraNetworkError, match="pass --lora-dir"):
        EN.find_lora("a", None)
    assert [p.name for p in EN.available(tmp_path)] == ["a.safetensors", "b.safetensors", "a2.safetensors",
                                                         "b.safetensors"]  # fmt: skip


def write_lora(pipe, path, seed):
    params = {"unet": pipe.params["unet"], "text_encoder": pipe.params["text_encoder"]}
    lora = init_lora(params, {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text_encoder": ("q_proj", "v_proj")},
                     4, 4.0, jax.random.key(seed))  # fmt: skip
    leaves, tree = jax.tree.flatten(lora.params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))  # both factors random: a visible update
    save_lora(path, Lora(jax.tree.unflatten(tree, [0.2 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]),
                         lora.alphas))  # fmt: skip
    return path


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    d = tmp_path_factory.mktemp("Lora")
    pipe = StableDiffusion.load(default_model_path())
    (d / "styles").mkdir()
    return d, write_lora(pipe, d / "styles" / "ink.safetensors", 0), write_lora(pipe, d / "film.safetensors", 5)


def same_tree(a, b):
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


def test_sets_merge_as_load_lora_does_and_restore_the_weights(loras):
    _, ink, film = loras
    pipe = StableDiffusion.load(default_model_path())
    base = dict(pipe.params)
    ref = StableDiffusion.load(default_model_path())
    ref.load_lora(ink, 0.7)
    sets = LoraSets(pipe)
    sets.use([(ink, 0.7, 0.7)])
    assert same_tree(pipe.params, ref.params)  # bit for bit what load_lora merges
    sets.use([(ink, 0.0, 0.8)])  # text encoder at 0: as loaded there, the U-Net changed
    assert same_tree(pipe.params["text_encoder"], base["text_encoder"])
    assert not same_tree(pipe.params["unet"], base["unet"])
    sets.use([(film, 1.0, 1.0), (ink, 0.7, 0.7)])
    sets.use([(ink, 0.7, 0.7)])  # back to an earlier set: no rounding accumulates
    assert same_tree(pipe.params, ref.params)
    sets.use(())
    assert same_tree(pipe.params, base)
    sets.use([(ink, 0.7, 0.7)])
    with pytest.raises(FileNotFoundError):
        sets.use([(film, 1.0, 1.0), (ink.parent / "gone.safetensors", 1.0, 1.0)])
    assert same_tree(pipe.params, ref.params) and sets.current == ((str(ink), 0.7, 0.7),)  # nothing half-applied


def test_sample_cli_tags_equal_the_lora_flag(loras, tmp_path, capsys):
    from sd_jax.cli.sample import main

    d, ink, _ = loras
    common = ["--seed", "4", "--steps", "3", "--height", "64", "--width", "64"]
    main(["--prompt", "a red circle on a blue background <lora:ink:0.6>", "--lora-dir", str(d), *common,
          "--output-dir", str(tmp_path / "tag")])  # fmt: skip
    main(["--prompt", "a red circle on a blue background ", "--lora", f"{ink}:0.6", *common,
          "--output-dir", str(tmp_path / "flag")])  # fmt: skip
    main(["--prompt", "a red circle on a blue background ", *common, "--output-dir", str(tmp_path / "plain")])
    tag, flag, plain = (np.asarray(Image.open(tmp_path / k / "00000-4.png"), np.float64)
                        for k in ("tag", "flag", "plain"))  # fmt: skip
    assert np.array_equal(tag, flag) and np.abs(tag - plain).mean() > 2  # the tag merged the LoRA at 0.6
    meta = parse_infotext(read_parameters(tmp_path / "tag" / "00000-4.png"))
    assert meta["Prompt"] == "a red circle on a blue background <lora:ink:0.6>"  # kept as written, as A1111
    assert meta["Lora hashes"] == f"ink: {hashing.lora_hash(ink)}"
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--prompt", "a cat <lora:nope>", "--lora-dir", str(d), *common, "--output-dir", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "<lora:nope>: no nope.safetensors in" in err
    assert not (tmp_path / "x").exists()  # refused before anything ran


def decode(text: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))).convert("RGB"), np.float64) / 255


def test_server_merges_a_prompts_loras_for_its_batch_only(loras):
    d, ink, film = loras
    with running_server("--lora-dir", str(d), "--max-batch", "2") as (base, state):
        ref = StableDiffusion.load(default_model_path())
        plain_ref, _ = ref.txt2img("a blue square ", negative="", **SAMPLE)
        ref.load_lora(ink, 1.0)
        tag_ref, _ = ref.txt2img("a blue square ", negative="", **SAMPLE)
        body = {"prompt": "a blue square <lora:ink>", "seed": 4, "steps": 3, "width": 64, "height": 64,
                "sampler_name": "Euler", "cfg_scale": 7.0}  # fmt: skip
        r = requests.post(base + "/sdapi/v1/txt2img", json=body, timeout=300)
        assert r.status_code == 200, r.text
        got = decode(r.json()["images"][0])
        assert np.abs(got - np.asarray(tag_ref)[0]).max() <= 1 / 255 + 1e-6
        meta = parse_infotext(json.loads(r.json()["info"])["infotexts"][0])
        assert meta["Prompt"] == body["prompt"] and meta["Lora hashes"] == f"ink: {hashing.lora_hash(ink)}"
        plain = requests.post(base + "/sdapi/v1/txt2img", json={**body, "prompt": "a blue square "}, timeout=300)
        assert np.abs(decode(plain.json()["images"][0]) - np.asarray(plain_ref)[0]).max() <= 1 / 255 + 1e-6
        assert np.abs(got - np.asarray(plain_ref)[0]).mean() > 0.01  # the LoRA did change the image
        names = {e["name"]: e["path"] for e in requests.get(base + "/sdapi/v1/loras", timeout=30).json()}
        assert names == {"ink": "styles/ink.safetensors", "film": "film.safetensors"}
        bad = requests.post(base + "/sdapi/v1/txt2img", json={**body, "prompt": "x <lora:../film>"}, timeout=60)
        assert bad.status_code == 422 and bad.json()["detail"][0]["loc"][-1] == "prompt"
        assert "no ../film.safetensors" in bad.json()["detail"][0]["msg"]
