"""Build tiny ControlNet fixtures and diffusers' reference residuals.

Needs the reference extra. Each ControlNet is ``ControlNetModel.from_unet`` of
a tiny fixture U-Net (tests/fixtures/<base>/unet) with every parameter,
including the zero convolutions, perturbed so that a wrong mapping cannot hide.
It is saved as a diffusers folder under ``tests/fixtures/controlnet/<name>``;
its outputs on fixed inputs go to ``tests/fixtures/reference/controlnet.npz``
(NCHW, as PyTorch produced them).

    python tools/make_controlnet_fixtures.py
"""

from __future__ import annotations

import pathlib

import numpy as np
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
# name -> (base fixture, seed, hint encoder channels; their number sets the 4x pixel/latent factor)
NETS = {"sd1": ("sd1", 11, (8, 16, 16)), "sd1_b": ("sd1", 12, (4, 8, 8)), "sdxl": ("sdxl", 13, (8, 16, 16))}


def build(name: str):
    from diffusers import ControlNetModel, UNet2DConditionModel

    base, seed, channels = NETS[name]
    unet = UNet2DConditionModel.from_pretrained(FIXTURES / base / "unet")
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=channels)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    net.eval().save_pretrained(FIXTURES / "controlnet" / name)
    return net, unet


def inputs(net, unet, seed: int):
    g = np.random.default_rng(seed)
    size = unet.config.sample_size
    factor = 2 ** (len(net.config.conditioning_embedding_out_channels) - 1)
    out = {
        "sample": g.standard_normal((2, 4, size, size)).astype(np.float32),
        "timestep": np.array([999.0, 321.0], np.float32),
        "context": g.standard_normal((2, 5, unet.config.cross_attention_dim)).astype(np.float32),
        "cond": g.random((2, 3, size * factor, size * factor)).astype(np.float32),
    }
    if unet.config.addition_embed_type == "text_time":
        dim = unet.config.projection_class_embeddings_input_dim - 6 * unet.config.addition_time_embed_dim
        out["text_embeds"] = g.standard_normal((2, dim)).astype(np.float32)
        out["time_ids"] = np.tile(np.array([[32, 32, 0, 0, 32, 32]], np.float32), (2, 1))
    return out


def reference(name: str) -> dict[str, np.ndarray]:
    net, unet = build(name)
    x = inputs(net, unet, seed=7)
    t = {k: torch.from_numpy(v) for k, v in x.items()}
    added = {"text_embeds": t["text_embeds"], "time_ids": t["time_ids"]} if "time_ids" in t else None
    ref = {f"{name}/{k}": v for k, v in x.items()}
    for tag, kw in {"plain": {}, "scaled": {"conditioning_scale": 0.6}, "guess": {"guess_mode": True,
                    "conditioning_scale": 0.8}}.items():  # fmt: skip
        with torch.no_grad():
            down, mid = net(t["sample"], t["timestep"], t["context"], t["cond"], added_cond_kwargs=added,
                            return_dict=False, **kw)  # fmt: skip
            for i, d in enumerate(down):
                ref[f"{name}/{tag}/down_{i}"] = d.numpy()
            ref[f"{name}/{tag}/mid"] = mid.numpy()
    with torch.no_grad():  # the U-Net with these residuals added
        down, mid = net(t["sample"], t["timestep"], t["context"], t["cond"], added_cond_kwargs=added,
                        return_dict=False)  # fmt: skip
        eps = unet(t["sample"], t["timestep"], t["context"], added_cond_kwargs=added,
                   down_block_additional_residuals=down, mid_block_additional_residual=mid).sample  # fmt: skip
    ref[f"{name}/unet_eps"] = eps.numpy()
    return ref


def main() -> None:
    ref = {}
    for name in NETS:
        ref.update(reference(name))
    np.savez_compressed(FIXTURES / "reference" / "controlnet.npz", **ref)
    print(f"wrote {len(ref)} arrays for {', '.join(NETS)}")


if __name__ == "__main__":
    main()
