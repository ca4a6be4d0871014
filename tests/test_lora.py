"""LoRA: parity with diffusers/peft (peft, kohya, older diffusers names), exact round trips, strict loading,
merge/unmerge, the LoRA and DreamBooth trainers and ``sample.py --lora``."""

import functools
import json
import pathlib

import jax
import numpy as np
import pytest
from conftest import fixed_batch_loss
from flax import traverse_util

from sd_jax.errors import ShapeMismatchError, UnexpectedKeyError
from sd_jax.loading.diffusers import load_checkpoint
from sd_jax.loading.lora import load_lora, read_lora_file, save_lora
from sd_jax.loading.safetensors_io import write_safetensors
from sd_jax.models.clip import CLIPTextModel
from sd_jax.models.lora import Lora, init_lora, merge_lora, target_modules, unmerge_lora
from sd_jax.models.unet import UNet2DConditionModel

IDS = np.array([[1112, 320, 929, 539, 550, 1113] + [1113] * 71, [1112, 368, 1113] + [1113] * 74], np.int32)


FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture(scope="module")
def base():
    ckpt = load_checkpoint(FIXTURES / "sd1")
    return ckpt, {"unet": ckpt.params("unet"), "text_encoder": ckpt.params("text_encoder")}


def inputs(seed=0, b=2):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, 4, 8, 8)).astype(np.float32)  # NCHW, as torch
    t = np.array([10.0, 700.0][:b], np.float32)
    ctx = rng.standard_normal((b, 5, 32)).astype(np.float32)
    return x, t, ctx


@functools.cache
def _apply(ucfg, tcfg):
    unet, text = UNet2DConditionModel(ucfg), CLIPTextModel(tcfg)

    def f(params, x, t, ctx):
        u = unet.apply({"params": params["unet"]}, x, t, ctx)
        return u, text.apply({"params": params["text_encoder"]}, IDS).last_hidden_state

    return jax.jit(f)


def ours(ckpt, params, seed=0):
    """(U-Net output NCHW, text encoder last hidden state) of ``params`` on fixed inputs."""
    x, t, ctx = inputs(seed)
    u, te = _apply(ckpt.config("unet"), ckpt.config("text_encoder"))(params, x.transpose(0, 2, 3, 1), t, ctx)
    return np.asarray(u).transpose(0, 3, 1, 2), np.asarray(te)


def random_lora(params, seed=0, rank=4, alpha=8.0, text=True):
    targets = {"unet": ("to_q", "to_k", "to_v", "to_out.0")}
    if text:
        targets["text_encoder"] = ("q_proj", "k_proj", "v_proj", "out_proj")
    lora = init_lora(params, targets, rank, alpha, jax.random.key(seed))
    # fresh adapters have up = 0; make both factors random so the update is visible
    leaves, tree = jax.tree.flatten(lora.params)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    leaves = [0.3 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)]
    return Lora(jax.tree.unflatten(tree, leaves), lora.alphas)


def max_err(a, b):
    return float(np.abs(np.asarray(a) - np.asarray(b)).max())


# -- parity with diffusers / peft --


def _diffusers_pipe(fixtures_dir):
    import diffusers

    return diffusers.StableDiffusionPipeline.from_pretrained(
        fixtures_dir / "sd1", safety_checker=None, requires_safety_checker=False
    )


def _theirs(pipe, seed=0):
    import torch

    x, t, ctx = inputs(seed)
    with torch.no_grad():
        u = pipe.unet(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(ctx)).sample.numpy()
        te = pipe.text_encoder(torch.from_numpy(IDS.astype(np.int64))).last_hidden_state.numpy()
    return u, te


@pytest.fixture(scope="module")
def peft_file(tmp_path_factory):
    """A random peft LoRA (ranks and alphas varying by pattern) saved by ``save_lora_weights``."""
    pytest.importorskip("peft")
    import torch
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _diffusers_pipe(FIXTURES)
    torch.manual_seed(0)
    ucfg = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        rank_pattern={"attn2.to_k": 2},
        alpha_pattern={"mid_block.attentions.0.transformer_blocks.0.attn1.to_q": 3},
    )
    tcfg = LoraConfig(
        r=2, lora_alpha=5, init_lora_weights=False, target_modules=["q_proj", "k_proj", "v_proj", "out_proj"]
    )
    pipe.unet.add_adapter(ucfg)
    pipe.text_encoder.add_adapter(tcfg)
    out = tmp_path_factory.mktemp("peft")
    StableDiffusionPipeline.save_lora_weights(
        out,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder),
        unet_lora_adapter_metadata=pipe.unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["default"].to_dict(),
    )
    adapted = _theirs(pipe)
    return out / "pytorch_lora_weights.safetensors", adapted


@pytest.mark.live
@pytest.mark.parametrize("fuse", [False, True])
def test_peft_file_matches_diffusers(fuse, peft_file, base, fixtures_dir):
    path, adapted = peft_file
    ckpt, params = base
    state, _ = read_lora_file(path)
    assert "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight" in state
    pipe = _diffusers_pipe(fixtures_dir)
    pipe.load_lora_weights(str(path))
    if fuse:
        pipe.fuse_lora(lora_scale=0.7)
    theirs = _theirs(pipe)
    lora = load_lora(path, params, unet_config=ckpt.config("unet"))
    mine = ours(ckpt, merge_lora(params, lora, 0.7 if fuse else 1.0))
    base_out = ours(ckpt, params)
    for name, a, b, c, o in zip(("unet", "text"), mine, theirs, adapted, base_out):
        err = max_err(a, b)
        print(f"fuse={fuse} {name}: max abs err vs diffusers {err:.2e} (LoRA changes it by {max_err(b, o):.2e})")
        assert err <= 1e-5 and max_err(b, o) > 1e-2
        if not fuse:
            assert max_err(b, c) <= 1e-5  # diffusers' reload equals the adapted model it was saved from
    rank2 = lora.params["unet"]["down_blocks_0"]["attentions_0"]["transformer_blocks_0"]["attn2"]["to_k"]["down"]
    assert rank2.shape == (32, 2)
    assert lora.alphas[("unet", "mid_block", "attentions_0", "transformer_blocks_0", "attn1", "to_q")] == 3.0


@pytest.mark.live
def test_our_files_load_in_diffusers(peft_file, base, fixtures_dir, tmp_path):
    """Ours -> diffusers naming and -> kohya naming: diffusers loads both to the same model as ours."""
    path, _ = peft_file
    ckpt, params = base
    lora = load_lora(path, params)
    for naming in ("diffusers", "kohya"):
        if naming == "kohya":
            # diffusers files kohya alphas under names that miss its alpha_pattern, so it applies the most common
            # alpha everywhere (kohya, A1111 and we use each module's own): compare on a file with one alpha
            lora = Lora(lora.params, dict.fromkeys(lora.alphas, 6.0))
        want = ours(ckpt, merge_lora(params, lora))
        out = save_lora(tmp_path / f"{naming}.safetensors", lora, naming=naming)
        pipe = _diffusers_pipe(fixtures_dir)
        pipe.load_lora_weights(str(out))
        theirs = _theirs(pipe)
        again = ours(ckpt, merge_lora(params, load_lora(out, params)))
        for name, a, b, c in zip(("unet", "text"), want, theirs, again):
            print(f"{naming} {name}: diffusers vs ours max abs err {max_err(a, b):.2e}")
            assert max_err(a, b) <= 1e-5 and max_err(a, c) <= 1e-6
    state, _ = read_lora_file(tmp_path / "kohya.safetensors")
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in state
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.alpha" in state


@pytest.mark.live
def test_older_diffusers_spellings_and_original_layout_names(peft_file, base, tmp_path):
    """``lora.down`` / ``lora_linear_layer`` (diffusers' own converter) and kohya names on the CompVis layout."""
    from diffusers.utils import convert_state_dict_to_diffusers

    from sd_jax.convert.single_file import unet_keys

    path, _ = peft_file
    ckpt, params = base
    want = load_lora(path, params)
    state, _ = read_lora_file(path)
    old = convert_state_dict_to_diffusers({k: np.array(v) for k, v in state.items()})
    assert any(".lora_linear_layer.down." in k for k in old) and any(".lora.down." in k for k in old)
    # without metadata diffusers takes alpha = rank: so do we
    write_safetensors(tmp_path / "old.safetensors", old)
    got = load_lora(tmp_path / "old.safetensors", params)
    assert jax.tree.all(jax.tree.map(np.array_equal, got.params, want.params))
    assert set(got.scales().values()) == {1.0}
    kohya, _ = read_lora_file(save_lora(tmp_path / "k.safetensors", want, naming="kohya"))
    table = {k[: -len(".weight")].replace(".", "_"): v[: -len(".weight")].replace(".", "_")
             for k, v in unet_keys(ckpt.config("unet")).items() if k.endswith(".weight")}  # fmt: skip
    sgm = {}
    for key, value in kohya.items():
        name, leaf = key.split(".", 1)
        if name.startswith("lora_unet_"):
            name = "lora_unet_" + table[name[len("lora_unet_") :]]
        sgm[f"{name}.{leaf}"] = value
    assert "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight" in sgm
    write_safetensors(tmp_path / "sgm.safetensors", sgm)
    got = load_lora(tmp_path / "sgm.safetensors", params, unet_config=ckpt.config("unet"))
    assert jax.tree.all(jax.tree.map(np.array_equal, got.params, want.params)) and got.alphas == want.alphas


# -- our own files --


def test_round_trip_is_exact(base, tmp_path):
    _, params = base
    lora = random_lora(params)
    lora.alphas[next(iter(lora.alphas))] = 1.5  # one module off the common alpha: an alpha_pattern entry
    for naming in ("diffusers", "kohya"):
        back = load_lora(save_lora(tmp_path / naming, lora, naming=naming), params)
        assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), lora.params, back.params))
        assert back.alphas == lora.alphas
    _, meta = read_lora_file(tmp_path / "diffusers")
    meta = json.loads(meta["lora_adapter_metadata"])
    assert meta["unet.r"] == 4 and meta["unet.lora_alpha"] == 8.0 and len(meta["unet.alpha_pattern"]) == 1


def test_unknown_key_names_the_key(base, tmp_path):
    _, params = base
    tensors, _ = read_lora_file(save_lora(tmp_path / "a.safetensors", random_lora(params, text=False)))
    for bad in ("unet.down_blocks.0.attentions.0.transformer_blocks.0.attn9.to_q.lora_A.weight",
                "lora_unet_nowhere_to_q.lora_down.weight", "unet.conv_in.hada_w1_a"):  # fmt: skip
        write_safetensors(tmp_path / "bad.safetensors", {**tensors, bad: np.zeros((4, 16), np.float32)})
        with pytest.raises(UnexpectedKeyError, match=bad.replace(".", r"\.")):
            load_lora(tmp_path / "bad.safetensors", params)
    gone = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_q.lora_B.weight"
    half = {k: v for k, v in tensors.items() if k != gone}
    write_safetensors(tmp_path / "half.safetensors", half)
    with pytest.raises(UnexpectedKeyError, match=r"attn1\.to_q has only its down/A half"):
        load_lora(tmp_path / "half.safetensors", params)
    wrong = dict(tensors)
    k = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.weight"
    wrong[k] = np.zeros((4, 17), np.float32)
    write_safetensors(tmp_path / "wrong.safetensors", wrong)
    with pytest.raises(ShapeMismatchError, match=r"attn1\.to_q.*\(17, 16\).*\(16, 16\)"):
        load_lora(tmp_path / "wrong.safetensors", params)


def test_scale_zero_is_the_base_and_unmerge_undoes(base):
    ckpt, params = base
    lora = random_lora(params)
    merged0 = merge_lora(params, lora, 0.0)
    assert jax.tree.all(jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), merged0, params))
    merged = merge_lora(params, lora, 0.8)
    assert max_err(ours(ckpt, merged)[0], ours(ckpt, params)[0]) > 1e-2
    back = unmerge_lora(merged, lora, 0.8)
    assert max(max_err(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params))) <= 1e-6
    n = len(target_modules(params["unet"], ("to_q", "to_k", "to_v", "to_out.0")))
    assert n == 4 * 2 * 4  # four transformers (down 0, mid, up 1 twice), two attentions, four projections
    flat = traverse_util.flatten_dict(merged["unet"])
    untouched = ("down_blocks_0", "attentions_0", "proj_in", "kernel")
    assert flat[untouched] is traverse_util.flatten_dict(params["unet"])[untouched]


# -- training --


def lora_config(name="lora", **kw):
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config("runlocal")
    c.unlock()
    c.update_from_flattened_dict(kw)  # "optim.lr"-style keys
    return c


def one_device():
    from sd_jax.sharding import make_mesh

    return make_mesh((1, 1, 1), devices=jax.devices()[:1])


def test_lora_training_learns_and_touches_only_the_adapters():
    from sd_jax.data import make_source
    from sd_jax.training import loop

    c = lora_config(batch_size=4, **{"optim.lr": 3e-2})
    c.train = ("unet", "text_encoder")
    t = loop.Trainer(c, mesh=one_device())
    src = make_source(c.data, t.tokenizers[0])
    state, frozen = t.init_state(), t.frozen()
    before = jax.device_get(frozen)
    evaluate = fixed_batch_loss(t, frozen, t.put_batch(src.batch(1000, 8)), draws=8)
    start = evaluate(state["params"])
    for step in range(8):
        state, _ = t.step(state, frozen, src.batch(step, c.batch_size))
    end = evaluate(state["params"])
    print(f"held-out loss {start:.4f} -> {end:.4f}")
    assert end < 0.95 * start
    # the state holds adapters only: down/up leaves, and Adam moments of the same size
    leaves = traverse_util.flatten_dict(jax.device_get(state["params"]))
    assert {k[-1] for k in leaves} == {"down", "up"} and {k[0] for k in leaves} == {"unet", "text_encoder"}
    n_lora = sum(v.size for v in leaves.values())
    n_opt = sum(x.size for x in jax.tree.leaves(state["opt"]) if x.ndim > 0)
    assert n_opt == 2 * n_lora and n_lora < 0.2 * sum(x.size for x in jax.tree.leaves(before["unet"]))
    after = jax.device_get(frozen)
    assert jax.tree.all(jax.tree.map(np.array_equal, before, after))  # base weights bit-identical
    fresh = load_checkpoint(lora_config().init_from)
    assert jax.tree.all(jax.tree.map(np.array_equal, after["unet"], fresh.params("unet")))


def test_lora_run_writes_a_file_that_sample_loads(tmp_path, capsys):
    from sd_jax import hashing
    from sd_jax.cli.sample import main
    from sd_jax.infotext import parse_infotext
    from sd_jax.pnginfo import read_parameters
    from sd_jax.training import loop

    c = lora_config(steps=2)
    r = loop.run(c, tmp_path / "run", log=lambda s: None, mesh=one_device())
    path = r.metrics["lora_file"]
    assert path == tmp_path / "run" / "pytorch_lora_weights.safetensors"
    ckpt, params = load_checkpoint(c.init_from), None
    params = {"unet": ckpt.params("unet"), "text_encoder": ckpt.params("text_encoder")}
    got = load_lora(path, params)
    assert jax.tree.all(jax.tree.map(np.array_equal, got.params, jax.device_get(r.state["params"])))
    assert set(got.scales().values()) == {c.lora.alpha / c.lora.rank}
    exported = loop.export(c, tmp_path / "run", tmp_path / "again.safetensors", mesh=one_device())
    assert read_lora_file(exported)[0].keys() == read_lora_file(path)[0].keys()
    out = tmp_path / "out"
    args = ["--model", c.init_from, "--prompt", "a cat", "--steps", "2", "--output-dir", str(out)]
    main([*args, "--lora", f"{path}:0.8", "--lora", str(path)])
    meta = parse_infotext(read_parameters(out / "00000-0.png"))  # A1111 numbering: NNNNN-SEED
    h = hashing.lora_hash(path)  # A1111's addnet hash, 12 hex
    assert meta["Lora hashes"] == f"pytorch_lora_weights: {h}, pytorch_lora_weights: {h}" and len(h) == 12
    assert meta["Lora weights"] == "pytorch_lora_weights: 0.8, pytorch_lora_weights: 1.0"
    with pytest.raises(SystemExit):
        main([*args, "--lora", str(tmp_path / "missing.safetensors:0.5")])
    assert "--lora " + str(tmp_path / "missing.safetensors") + ": no such file" in capsys.readouterr().err


def test_dreambooth_with_prior_preservation(tmp_path):
    from PIL import Image

    from sd_jax.training import loop

    inst = tmp_path / "instance"
    inst.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 30, 200)]):
        Image.new("RGB", (40, 36), color).save(inst / f"{i}.png")
    c = lora_config("dreambooth", steps=2, **{"data.path": str(inst), "data.class_path": str(tmp_path / "class")})
    lines = []
    m = loop.train(c, tmp_path / "run", log=lines.append, mesh=one_device())
    assert len(list((tmp_path / "class").glob("class_*.png"))) == c.data.num_class_images
    assert any("sampling 2 class image(s)" in line for line in lines)
    assert any("instance_loss" in line and "prior_loss" in line for line in lines)
    w = c.objective.prior_loss_weight
    assert m["prior_loss"] > 0 and abs(m["loss"] - (m["instance_loss"] + w * m["prior_loss"])) < 1e-5
    assert m["lora_file"].exists()
    # a second run finds its class images and samples none
    lines.clear()
    loop.train(lora_config("dreambooth", steps=3, **{"data.path": str(inst),
                       "data.class_path": str(tmp_path / "class")}), tmp_path / "run", log=lines.append,
                       mesh=one_device())  # fmt: skip
    assert not any("sampling" in line for line in lines)


def test_lora_run_samples_with_its_adapters(tmp_path):
    """sample_every during LoRA training renders the base weights with the adapters folded in."""
    from PIL import Image

    from sd_jax.pipelines.images import make_grid, to_uint8
    from sd_jax.pipelines.pipeline import StableDiffusion
    from sd_jax.training import loop

    prompts = ("a cat", "a dog")
    c = lora_config(steps=2, sample_every=2, sample_steps=2, sample_prompts=prompts, **{"optim.lr": 3e-2})
    m = loop.train(c, tmp_path / "run", log=lambda s: None, mesh=one_device())
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_2.png"))
    pipe = StableDiffusion.load(c.init_from, safety_checker=False)
    size = c.data.image_size
    kw = dict(height=size, width=size, steps=2, guidance_scale=7.5, seed=0, sampler="euler")  # sample_sampler's default
    base, _ = pipe.txt2img(list(prompts), **kw)
    pipe.load_lora(m["lora_file"])
    images, _ = pipe.txt2img(list(prompts), **kw)
    expect = to_uint8(make_grid(images, rows=1))
    assert grid.shape == expect.shape
    assert np.abs(expect.astype(int) - grid.astype(int)).max() <= 1
    assert np.abs(to_uint8(make_grid(base, rows=1)).astype(int) - grid.astype(int)).max() > 1  # adapters matter
