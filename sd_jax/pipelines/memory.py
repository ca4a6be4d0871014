"""A rough, honest estimate of a sampling run's peak memory, from the configs alone (before anything is allocated).

It counts what dominates at large sizes and batches: the latents, the U-Net's feature maps at every level
(the skip connections kept for the up path plus a few working maps at the top level), the attention score
matrix where it is materialised (XLA's path on GPU/TPU; our CPU path works in 16 MiB blocks), and the VAE
decoder's full-resolution feature maps (or one tile's, when tiling). It is meant to refuse a request that
cannot fit by a wide margin, not to predict XLA's allocator to the byte.
"""

from __future__ import annotations

import dataclasses
import os

F32 = 4
CPU_SCORE_BLOCK = 1 << 24  # bytes of scores the CPU attention path holds per step (the blocked kernel's, in fp32)
WORKING_MAPS = 8  # live top-level maps inside a resnet/transformer block (norm, activation, conv, concat...)


@dataclasses.dataclass(frozen=True)
class Estimate:
    parts: dict[str, int]  # name -> bytes

    @property
    def total(self) -> int:
        return sum(self.parts.values())

    def describe(self) -> str:
        gib = lambda n: f"{n / 2**30:.3g} GiB"  # noqa: E731
        return f"{gib(self.total)} (" + ", ".join(f"{k} {gib(v)}" for k, v in self.parts.items() if v) + ")"


def sampling_memory(unet, vae, *, batch: int, height: int, width: int, guidance: bool = True,
                    micro_batch: int | None = None, tiled: bool | None = None, dtype_bytes: int = F32,
                    backend: str = "cpu", latent_factor: int | None = None, params: int = 0) -> Estimate:  # fmt: skip
    """Peak bytes of sampling ``batch`` images of ``height`` x ``width`` pixels (the decoded size).

    ``unet``/``vae`` are our ``UNetConfig``/``VAEConfig``. ``latent_factor`` is pixels per latent
    (default: the VAE's factor; the x4 upscaler's latents are the low-res image's size, factor 4).
    ``params`` is the models' parameter count (held at ``dtype_bytes`` each).
    """
    f = latent_factor or vae.downsample_factor
    h, w = max(1, height // f), max(1, width // f)
    unet_batch = (micro_batch or batch) * (2 if guidance else 1)
    n = h * w
    skips, attn = 0, 0
    for level, (c, layers, kind) in enumerate(zip(unet.block_out_channels, unet.layers_per_block,
                                                  unet.down_block_types)):  # fmt: skip
        tokens = n // 4**level
        skips += (layers + 1) * c * tokens
        if "CrossAttn" in kind and not attn:  # the largest attention: the first level that has it
            heads = unet.attention_heads[level]
            attn = heads * tokens * tokens * F32 if backend != "cpu" else CPU_SCORE_BLOCK
    unet_bytes = unet_batch * (dtype_bytes * (skips + WORKING_MAPS * unet.block_out_channels[0] * n) + attn)
    tile = vae.sample_size
    side = max(height, width)
    if tiled or (tiled is None and side > 2 * tile):  # decode tile by tile (as StableDiffusion.decode decides)
        px, dec_batch = tile * tile, 1
    else:
        px, dec_batch = height * width, batch
    latent_tokens = px // vae.downsample_factor**2
    mid_attn = latent_tokens * latent_tokens * F32 if backend != "cpu" else CPU_SCORE_BLOCK
    vae_bytes = dec_batch * (F32 * WORKING_MAPS // 2 * vae.block_out_channels[0] * px + mid_attn)
    return Estimate(
        {
            "weights": params * dtype_bytes,
            "latents": 3 * batch * n * unet.in_channels * F32,  # noise, the loop's carry, the result
            "U-Net activations": unet_bytes,
            "VAE decode": vae_bytes,
            "images": 2 * batch * height * width * 3 * F32,
        }
    )


def device_memory_bytes() -> int:
    """Memory of the first device: the accelerator's limit, or the host's physical RAM on CPU."""
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if dev.platform != "cpu" else None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
