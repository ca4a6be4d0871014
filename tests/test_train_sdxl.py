"""SDXL fine-tuning from the tiny SDXL fixture: it learns, both encoders and the micro-conditioning reach the loss,
the loss equals diffusers' train_text_to_image_sdxl.py computation, and the export loads in both stacks."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.sdxl_finetune import get_config
from sd_jax.data import make_source
from sd_jax.data.transforms import preprocess
from sd_jax.tokenizer import load_tokenizer, tokenize
from sd_jax.training import loop
from sd_jax.training import model as model_lib
from sd_jax.training.conditioning import sdxl_batch_extras, text_conditioning

FIXTURES = pathlib.Path(__file__).parent / "fixtures"
SDXL = FIXTURES / "sdxl"
CAPTIONS = ["a red picture", "", "a blue picture", "a green picture with a long caption " * 3]


def sdxl_config(**kw):
    c = get_config("runlocal")
    c.unlock()
    c.init_from = str(SDXL)
    c.update_from_flattened_dict(kw)  # "optim.lr"-style keys
    return c


def fixed_batch(n=8, original_size=None, crop_top_left=None):
    images = np.tanh(np.random.default_rng(0).standard_normal((n, 32, 32, 3))).astype(np.float32)
    captions = (CAPTIONS * 2)[:n]
    batch = {"images": images, "input_ids": tokenize(load_tokenizer(SDXL / "tokenizer"), captions)}
    if original_size is not None:
        batch["original_size"] = np.asarray(original_size, np.int32)
        batch["crop_top_left"] = np.asarray(crop_top_left, np.int32)
    return batch


def device_batch(trainer, batch):
    return {**{k: np.asarray(v) for k, v in batch.items()}, **sdxl_batch_extras(batch, trainer.tokenizers)}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A few fine-tuning steps with the real loop (synthetic data), the held-out loss before and after, an export."""
    tmp = tmp_path_factory.mktemp("sdxl")
    cfg = sdxl_config(steps=6, **{"optim.ema_decay": 0.0})
    t = loop.Trainer(cfg)
    frozen = t.frozen()
    batch = device_batch(t, make_source(cfg.data, t.tokenizers[0]).batch(1000, 8))
    keys = jax.random.split(jax.random.key(0), 4)

    @jax.jit
    def held_out(unet, batch):  # the same 4 noise/timestep draws every call; lax.map compiles the loss once
        return jnp.mean(jax.lax.map(lambda k: t.loss({"unet": unet}, frozen, batch, k)[0], keys))

    before = float(held_out(t.params["unet"], batch))
    r = loop.run(cfg, tmp / "run", log=lambda s: None)
    after = float(held_out(r.state["params"]["unet"], batch))
    out = loop.export(cfg, tmp / "run", tmp / "export", use_ema=False)
    return {
        "cfg": cfg,
        "trainer": t,
        "held_out": held_out,
        "before": before,
        "after": after,
        "metrics": r.metrics,
        "state": r.state,
        "out": out,
    }


def test_sdxl_finetune_learns(run):
    print("held-out loss before", run["before"], "after", run["after"], "last", run["metrics"]["loss"])
    assert run["metrics"]["step"] == 6 and np.isfinite(run["metrics"]["loss"])
    assert run["after"] < 0.9 * run["before"]
    t = run["trainer"]
    assert t.comps.sdxl and set(t.frozen_names) == {"vae", "text_encoder", "text_encoder_2"}
    assert t.comps.schedule.prediction_type == "epsilon"  # from the fixture's scheduler config


def test_micro_conditioning_reaches_the_loss(run):
    t, unet = run["trainer"], run["trainer"].params["unet"]
    n = 8  # the held-out batch's shape: no recompile
    square = device_batch(t, fixed_batch())
    assert (square["original_size"] == 32).all() and (square["crop_top_left"] == 0).all()  # defaults
    explicit = device_batch(t, fixed_batch(original_size=[[32, 32]] * n, crop_top_left=[[0, 0]] * n))
    cropped = device_batch(t, fixed_batch(original_size=[[300, 200]] * n, crop_top_left=[[40, 7]] * n))
    base = float(run["held_out"](unet, square))
    assert float(run["held_out"](unet, explicit)) == base
    assert abs(float(run["held_out"](unet, cropped)) - base) > 1e-4


def test_second_ids_are_tokenizer_2s(run):
    ids = device_batch(run["trainer"], fixed_batch())["input_ids_2"]
    np.testing.assert_array_equal(ids, tokenize(load_tokenizer(SDXL / "tokenizer_2"), CAPTIONS * 2))
    assert (ids[1, 2:] == 0).all()  # "!" padding, where the first tokenizer pads with <|endoftext|>


def test_both_encoders_get_gradients(run):
    """Gradients reach exactly the encoder weights SDXL's conditioning uses, and only for trained encoders."""
    t = run["trainer"]
    batch = device_batch(t, fixed_batch())
    enc = {n: t.params[n] for n in ("text_encoder", "text_encoder_2")}

    def grads(trainable):
        f = lambda p: sum(jnp.sum(x) for x in jax.tree.leaves(text_conditioning(t.comps, p, batch, trainable)))  # noqa: E731
        return jax.jit(jax.grad(f))(enc)

    def norm(tree):
        return float(sum(np.abs(np.asarray(x)).sum() for x in jax.tree.leaves(tree)))

    g = grads(("unet", "text_encoder", "text_encoder_2"))
    g1, g2 = g["text_encoder"]["text_model"], g["text_encoder_2"]
    assert norm(g1["encoder"]["layers_1"]) > 0 and norm(g2["text_model"]["encoder"]["layers_1"]) > 0  # penultimate
    # CLIP-L's last layer and final norm are unused (penultimate states only); bigG's feed the pooled text_embeds.
    assert norm(g1["encoder"]["layers_2"]) == 0 and norm(g1["final_layer_norm"]) == 0
    assert norm(g2["text_model"]["final_layer_norm"]) > 0 and norm(g2["text_projection"]) > 0
    frozen_2 = grads(("unet", "text_encoder"))
    assert norm(frozen_2["text_encoder"]) > 0 and norm(frozen_2["text_encoder_2"]) == 0


def test_fsdp_shards_the_second_encoder():
    from sd_jax.sharding import make_mesh

    cfg = sdxl_config(train=("unet", "text_encoder_2"), sharding="fsdp")
    t = loop.Trainer(cfg, mesh=make_mesh((1, 8, 1)))
    state, frozen = t.init_state(), t.frozen()
    kernel = state["params"]["text_encoder_2"]["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    mu = state["opt"][1][0].mu["text_encoder_2"]["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    frozen_kernel = frozen["text_encoder"]["text_model"]["encoder"]["layers_0"]["mlp"]["fc1"]["kernel"]
    for arr in (kernel, mu, frozen_kernel):
        assert len(arr.sharding.device_set) == 8 and arr.addressable_shards[0].data.size < arr.size


def test_bad_component_and_mismatched_checkpoint_are_named():
    from sd_jax.training.trainers import objective_for

    cfg = sdxl_config(init_from=str(FIXTURES / "sd1"), train=("unet", "text_encoder_2"))
    comps, params = model_lib.build(cfg)
    with pytest.raises(ValueError, match=r"config.train names \['text_encoder_2'\]"):
        objective_for(cfg)(cfg, comps, params)  # the objective checks what it trains, before any step


def test_latent_cache_refuses_sdxl(tmp_path):
    from sd_jax.cli.cache import cache_from_config as build_cache

    cfg = sdxl_config(train=("unet",))
    with pytest.raises(ValueError, match="data.cache does not support SDXL"):
        build_cache(cfg, tmp_path / "cache")


def test_preprocess_records_the_crop(tmp_path):
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), np.uint8))  # h=40, w=60
    arr, original, (top, left) = preprocess(img, 32, np.random.default_rng(0), random_flip=False, with_crop=True)
    assert original == (40, 60) and (top, left) == (0, 8)
    resized = np.asarray(img.resize((48, 32), Image.BICUBIC), np.float32) / 127.5 - 1.0
    np.testing.assert_array_equal(arr, resized[:, 8:40])
    flips, lefts = 0, set()
    for seed in range(8):  # random crops, some flipped: the crop is measured in the image as the model sees it
        arr, _, (top, left) = preprocess(img, 32, np.random.default_rng(seed), random_crop=True, with_crop=True)
        window = (slice(top, top + 32), slice(left, left + 32))
        flipped = np.array_equal(arr, resized[:, ::-1][window])
        assert flipped or np.array_equal(arr, resized[window])
        flips, lefts = flips + flipped, lefts | {left}
    assert 0 < flips < 8 and len(lefts) > 2
    img.save(tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("a picture")
    cfg = sdxl_config(**{"data.source": "folder", "data.path": str(tmp_path)}).data
    b = make_source(cfg, load_tokenizer(), workdir=tmp_path / "run").batch(0, 2)
    assert b["original_size"].tolist() == [[40, 60]] * 2 and b["crop_top_left"].shape == (2, 2)


def test_export_loads_in_our_pipeline(run):
    from sd_jax.loading.diffusers import load_checkpoint
    from sd_jax.pipelines.pipeline import StableDiffusion

    ckpt = load_checkpoint(run["out"])
    assert ckpt.pipeline_class == "StableDiffusionXLPipeline" and ckpt.index["force_zeros_for_empty_prompt"]
    trained = jax.device_get(run["state"]["params"]["unet"])
    assert (
        max(
            float(np.abs(np.asarray(a) - np.asarray(b)).max())
            for a, b in zip(jax.tree.leaves(ckpt.params("unet")), jax.tree.leaves(trained))
        )
        == 0.0
    )
    pipe = StableDiffusion.load(run["out"])
    assert pipe.is_sdxl and pipe.components.tokenizers[1].pad_token == "!"
    images, _ = pipe.txt2img(["a red picture"], steps=2, height=32, width=32)
    assert images.shape == (1, 32, 32, 3) and np.isfinite(images).all()


@pytest.mark.live
def test_export_loads_in_diffusers(run):
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(run["out"])
    trained = jax.device_get(run["state"]["params"]["unet"])
    w = pipe.unet.state_dict()["conv_in.weight"].numpy()
    np.testing.assert_array_equal(w, np.transpose(np.asarray(trained["conv_in"]["kernel"]), (3, 2, 0, 1)))
    out = pipe("a red picture", num_inference_steps=2, height=32, width=32, output_type="np",
               generator=torch.Generator().manual_seed(0))  # fmt: skip
    assert out.images.shape == (1, 32, 32, 3) and np.isfinite(out.images).all()


@pytest.mark.live
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_loss_matches_diffusers_training_script(prediction_type):
    """Our loss == diffusers' train_text_to_image_sdxl.py (UNet2DConditionModel, both CLIP encoders, DDPMScheduler,
    --noise_offset, compute_snr min-SNR weights), given the same latent sample, timesteps and noise draws."""
    import torch
    import torch.nn.functional as F
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import compute_snr
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    cfg = sdxl_config(**{"objective.prediction_type": prediction_type, "objective.min_snr_gamma": 5.0,
                         "objective.offset_noise": 0.05})  # fmt: skip
    t = loop.Trainer(cfg)
    n = len(CAPTIONS)
    sizes, crops = [[300, 200], [32, 32], [64, 48], [1024, 768]], [[40, 7], [0, 0], [16, 0], [3, 100]]
    batch = device_batch(t, fixed_batch(n, original_size=sizes, crop_top_left=crops))
    key = jax.random.key(3)
    ours = float(jax.jit(lambda b: t.loss({"unet": t.params["unet"]}, t.frozen(), b, key)[0])(batch))

    # The same draws as loss_fn: the latent sample's eps, then timesteps and noise.
    k_enc, k_loss = jax.random.split(key)
    k_t, k_n, k_o = jax.random.split(k_loss, 3)
    eps = np.asarray(jax.random.normal(k_enc, (n, 8, 8, 4)))
    timesteps = np.asarray(jax.random.randint(k_t, (n,), 0, 1000))
    noise = np.asarray(jax.random.normal(k_n, (n, 8, 8, 4)))
    offset = np.asarray(jax.random.normal(k_o, (n, 1, 1, 4)))  # the script's --noise_offset draw
    nchw = lambda a: torch.from_numpy(np.ascontiguousarray(np.transpose(a, (0, 3, 1, 2))))  # noqa: E731

    with torch.no_grad():
        vae = AutoencoderKL.from_pretrained(SDXL / "vae")
        dist = vae.encode(nchw(batch["images"])).latent_dist
        latents = (dist.mean + dist.std * nchw(eps)) * vae.config.scaling_factor
        sched = DDPMScheduler.from_pretrained(SDXL, subfolder="scheduler")
        sched.register_to_config(prediction_type=prediction_type)
        ts = torch.from_numpy(timesteps.astype(np.int64))
        noise = nchw(noise) + cfg.objective.offset_noise * nchw(offset)
        noisy = sched.add_noise(latents, noise, ts)
        embeds, pooled = [], None
        for tok_dir, enc in (("tokenizer", CLIPTextModel), ("tokenizer_2", CLIPTextModelWithProjection)):
            tok = CLIPTokenizer.from_pretrained(SDXL / tok_dir)
            ids = tok(CAPTIONS, padding="max_length", max_length=tok.model_max_length, truncation=True,
                      return_tensors="pt").input_ids  # fmt: skip
            out = enc.from_pretrained(SDXL / tok_dir.replace("tokenizer", "text_encoder"))(
                ids, output_hidden_states=True, return_dict=False
            )
            pooled = out[0]
            embeds.append(out[-1][-2])
        add_time_ids = torch.tensor([s + c + [32, 32] for s, c in zip(sizes, crops)], dtype=torch.float32)
        unet = UNet2DConditionModel.from_pretrained(SDXL / "unet")
        pred = unet(noisy, ts, torch.cat(embeds, dim=-1),
                    added_cond_kwargs={"time_ids": add_time_ids, "text_embeds": pooled}).sample  # fmt: skip
        target = noise if prediction_type == "epsilon" else sched.get_velocity(latents, noise, ts)
        snr = compute_snr(sched, ts)
        weights = torch.stack([snr, 5.0 * torch.ones_like(ts)], dim=1).min(dim=1)[0]
        weights = weights / snr if prediction_type == "epsilon" else weights / (snr + 1)
        ref = float((F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=[1, 2, 3]) * weights).mean())
    print(prediction_type, "ours", ours, "diffusers", ref, "diff", abs(ours - ref))
    assert abs(ours - ref) <= 1e-5 * max(1.0, abs(ref))


# -- in-training samples and LoRA on SDXL (both built from the one Components value) --


@pytest.mark.slow  # 2.5 min; in-training samples: test_training_logging's tiny run in the default run
def test_sdxl_samples_during_training(tmp_path):
    """sample_every on an SDXL run renders through both encoders (context, text_embeds, time_ids): the grid is the
    pipeline's own image of the trained weights."""
    from sd_jax.pipelines.images import make_grid, to_uint8
    from sd_jax.pipelines.pipeline import StableDiffusion

    prompts = ("a red picture", "a blue picture")
    cfg = sdxl_config(steps=1, sample_every=1, sample_steps=2, sample_prompts=prompts, **{"optim.ema_decay": 0.0})
    r = loop.run(cfg, tmp_path / "run", log=lambda s: None)
    grid = np.asarray(Image.open(tmp_path / "run" / "samples" / "step_1.png"))
    pipe = StableDiffusion.load(SDXL, safety_checker=False)
    pipe.params["unet"] = jax.device_get(r.state["params"]["unet"])
    size = cfg.data.image_size
    images, _ = pipe.txt2img(list(prompts), height=size, width=size, steps=2, guidance_scale=7.5, seed=0,
                             sampler="euler")  # fmt: skip
    expect = to_uint8(make_grid(images, rows=1))
    assert grid.shape == expect.shape
    assert np.abs(expect.astype(int) - grid.astype(int)).max() <= 1


def sdxl_lora_config(**kw):
    from configs.lora import get_config as lora_config

    c = lora_config("runlocal")
    c.unlock()
    c.init_from = str(SDXL)
    c.train = ("unet", "text_encoder_2")
    c.update_from_flattened_dict(kw)
    return c


def test_sdxl_lora_trains_the_second_encoder(tmp_path):
    """train naming text_encoder_2: its adapters reach the loss (nonzero gradient, they move in a step) and the
    written file holds them in diffusers naming (``text_encoder_2.text_model...lora_A.weight``), loading back."""
    from flax import traverse_util

    from sd_jax.loading.lora import load_lora, read_lora_file
    from sd_jax.sharding import make_mesh

    one = make_mesh((1, 1, 1), devices=jax.devices()[:1])
    cfg = sdxl_lora_config(steps=2, batch_size=4)
    t = loop.Trainer(cfg, mesh=one)
    state, frozen = t.init_state(), t.frozen()
    assert set(t.frozen_names) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    batch = t.put_batch(fixed_batch(4))
    g = jax.jit(jax.grad(lambda p: t.loss(p, frozen, batch, jax.random.key(0))[0]))(state["params"])
    g2 = traverse_util.flatten_dict(jax.device_get(g["text_encoder_2"]))
    assert g2 and sum(float(np.abs(v).sum()) for k, v in g2.items() if k[-1] == "up") > 0

    r = loop.run(cfg, tmp_path / "run", log=lambda s: None, mesh=one)
    te2 = traverse_util.flatten_dict(jax.device_get(r.state["params"]["text_encoder_2"]))
    assert any(np.abs(v).max() > 0 for k, v in te2.items() if k[-1] == "up")  # zero-initialized, now trained
    tensors, _ = read_lora_file(r.metrics["lora_file"])
    names = [k for k in tensors if k.startswith("text_encoder_2.")]
    assert "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in names
    assert len(names) == len(te2) and not any(k.startswith("text_encoder.") for k in tensors)
    base = {n: t.params[n] for n in ("unet", "text_encoder", "text_encoder_2")}
    got = load_lora(r.metrics["lora_file"], base)
    assert jax.tree.all(jax.tree.map(np.array_equal, got.params, jax.device_get(r.state["params"])))
