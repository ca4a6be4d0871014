"""Worker for diffusers PyTorch (eval, no_grad, SDPA): U-Net step, txt2img, training, peak memory.

GPU mode (``device: "cuda"``) adds ``torch.compile`` of the U-Net.
"""

from __future__ import annotations

import math
import pathlib

from bench.workers.protocol import peak_rss_bytes, serve, timed

SCHEDULERS = {"ddim": "DDIMScheduler", "euler": "EulerDiscreteScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler"}


def _torch(spec):
    import torch

    torch.manual_seed(0)
    if spec.get("threads"):
        torch.set_num_threads(spec["threads"])
    return torch


def _dtype(torch, name):
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def _versions():
    import diffusers
    import torch
    import transformers

    out = {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__,
           "torch_threads": torch.get_num_threads()}  # fmt: skip
    if torch.cuda.is_available():
        out["cuda_device"] = torch.cuda.get_device_name()
    return out


def _sync(torch, device):
    if device == "cuda":
        torch.cuda.synchronize()


def unet_step(spec):
    torch = _torch(spec)
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import AttnProcessor2_0

    device, dt = spec.get("device", "cpu"), _dtype(torch, spec["dtype"])
    unet = UNet2DConditionModel.from_config(spec["unet_config"]).to(device=device, dtype=dt).eval()
    unet.set_attn_processor(AttnProcessor2_0())  # scaled_dot_product_attention
    if spec.get("compile"):
        unet = torch.compile(unet.to(memory_format=torch.channels_last), mode=spec["compile"], fullgraph=True)
    b, s, n = spec["batch"], spec["latent_size"], spec["context_len"]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(b, unet.config.in_channels, s, s, generator=g).to(device, dt)
    ctx = torch.randn(b, n, unet.config.cross_attention_dim, generator=g).to(device, dt)
    t = torch.full((b,), 500.0).to(device)

    def step():
        with torch.no_grad():
            unet(x, t, encoder_hidden_states=ctx)
        _sync(torch, device)

    first = timed(step)
    return {"first_s": first, "versions": _versions()}, {"run": lambda _: {"seconds": timed(step)}}


def _pipeline(spec):
    torch = _torch(spec)
    import diffusers

    device, dt = spec.get("device", "cpu"), _dtype(torch, spec["dtype"])
    if device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"torch {torch.__version__} sees no CUDA device: GPU mode needs a CUDA build of torch")
    extra = (
        {}
        if (pathlib.Path(spec["folder"]) / "text_encoder_2").is_dir()
        else {"safety_checker": None, "requires_safety_checker": False}
    )
    pipe = diffusers.DiffusionPipeline.from_pretrained(spec["folder"], torch_dtype=dt, **extra).to(device)  # SD or SDXL
    sched = getattr(diffusers, SCHEDULERS[spec["sampler"]])
    pipe.scheduler = sched.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    from diffusers.models.attention_processor import AttnProcessor2_0

    pipe.unet.set_attn_processor(AttnProcessor2_0())
    if spec.get("compile"):  # as diffusers' docs advise
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.unet = torch.compile(pipe.unet, mode=spec["compile"], fullgraph=True)

    def generate():
        with torch.no_grad():
            out = pipe([spec["prompt"]] * spec["batch"], num_inference_steps=spec["steps"], height=spec["size"],
                       width=spec["size"], guidance_scale=spec["guidance"], output_type="np",
                       generator=torch.Generator().manual_seed(0)).images  # fmt: skip
        _sync(torch, device)
        return out

    return generate


def txt2img(spec):
    generate = _pipeline(spec)
    first = timed(generate)
    run = lambda _: {"seconds": timed(generate) / spec["batch"]}  # noqa: E731
    return {"first_s": first, "versions": _versions()}, {"run": run}


def memory(spec):
    generate = _pipeline(spec)
    loaded = peak_rss_bytes()  # the peak so far: loading the weights
    generate()
    return {"peak_rss_bytes": peak_rss_bytes(), "load_peak_rss_bytes": loaded}, {}


def train(spec):
    """A plain PyTorch loop doing what our trainer's step does.

    Frozen VAE, text encoder frozen or trained as in the config, U-Net forward and backward,
    epsilon (or v) MSE with min-SNR-gamma weights, global-norm clipping, AdamW, EMA of the weights.
    """
    torch = _torch(spec)
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    if spec["trainable"] not in (["unet"], ["unet", "text_encoder"]):
        raise ValueError(f"the PyTorch loop trains the U-Net (and text encoder), not {spec['trainable']}")
    if spec["optim"]["grad_accum"] != 1:
        raise ValueError("the PyTorch loop has no gradient accumulation")

    unet = UNet2DConditionModel.from_config(spec["unet_config"]).train()
    vae = AutoencoderKL.from_config(spec["vae_config"]).eval().requires_grad_(False)
    text = CLIPTextModel(CLIPTextConfig.from_dict(spec["text_config"]))
    train_text = "text_encoder" in spec["trainable"]
    text.train(train_text).requires_grad_(train_text)
    params = list(unet.parameters()) + (list(text.parameters()) if train_text else [])
    ema = [p.detach().clone() for p in params]
    o = spec["optim"]
    opt = torch.optim.AdamW(params, lr=o["lr"], betas=(o["b1"], o["b2"]), weight_decay=o["weight_decay"])
    ac = torch.tensor(spec["alphas_cumprod"], dtype=torch.float32)
    v_pred = spec["prediction_type"] == "v_prediction"
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=spec["compute_dtype"] == "bfloat16")
    bs, size, gamma = spec["batch_size"], spec["image_size"], spec["min_snr_gamma"]
    g = torch.Generator().manual_seed(0)
    n_ids = text.config.max_position_embeddings  # 77, or 16 for the embedded model
    batches = [(torch.rand(bs, 3, size, size, generator=g) * 2 - 1,
                torch.randint(0, text.config.vocab_size, (bs, n_ids), generator=g)) for _ in range(4)]  # fmt: skip
    scaling = vae.config.scaling_factor
    counter = {"i": 0}

    def step():
        images, ids = batches[counter["i"] % len(batches)]
        counter["i"] += 1
        with torch.no_grad():
            z = vae.encode(images).latent_dist.sample() * scaling
        with torch.set_grad_enabled(train_text), autocast:
            ctx = text(ids).last_hidden_state
        t = torch.randint(0, len(ac), (bs,))
        noise = torch.randn_like(z)
        a = ac[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * z + (1 - a).sqrt() * noise
        with autocast:
            out = unet(x_t, t, encoder_hidden_states=ctx).sample
        target = a.sqrt() * noise - (1 - a).sqrt() * z if v_pred else noise
        per_example = ((out.float() - target) ** 2).mean(dim=(1, 2, 3))
        if gamma:
            snr = ac[t] / (1 - ac[t])
            per_example = per_example * torch.clamp(snr, max=gamma) / (snr + 1 if v_pred else snr)
        loss = per_example.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if o["clip_norm"]:
            torch.nn.utils.clip_grad_norm_(params, o["clip_norm"])
        opt.step()
        if o["ema_decay"]:
            with torch.no_grad():
                torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - o["ema_decay"])
        if not math.isfinite(loss.item()):
            raise FloatingPointError("training loss is not finite")

    first = timed(step)
    step()
    n = spec["steps_per_run"]

    def run(_):
        return {"images_per_s": n * bs / timed(lambda: [step() for _ in range(n)])}

    return {"first_s": first, "versions": _versions()}, {"run": run}


TASKS = {"unet_step": unet_step, "txt2img": txt2img, "memory": memory, "train": train}

if __name__ == "__main__":
    serve(lambda spec: TASKS[spec["task"]](spec))
