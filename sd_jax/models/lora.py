"""LoRA (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") as a parameter transform.

The models stay unchanged: a LoRA is a small pytree of ``down``/``up`` factors per adapted kernel, and
``W_eff = W + scale * alpha / rank * down @ up`` is computed from ``{base, lora}`` (inside the jitted training
loss, or once before sampling). Our kernels are Flax layout, ``(in, out)`` for Dense and HWIO for Conv, so
``down`` is ``(in, r)`` (or ``(kh, kw, in, r)``) and ``up`` is ``(r, out)``: torch's ``B @ A`` transposed.

Tree: ``{component: {module path...: {"down", "up"}}}`` with components ``unet``, ``text_encoder``,
``text_encoder_2``; the alphas are a separate ``{(component, *module path): alpha}`` dict of floats.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import traverse_util

from sd_jax.convert.diffusers import _flat_target, flax_path_to_torch_key

# diffusers' default U-Net attention targets; the text encoder's CLIP attention projections.
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclasses.dataclass
class Lora:
    """LoRA factors (a pytree of arrays) and their alphas (plain floats: static under jit)."""

    params: dict
    alphas: dict[tuple[str, ...], float]

    def scales(self) -> dict[tuple[str, ...], float]:
        """alpha / rank per adapted module."""
        flat = traverse_util.flatten_dict(self.params)
        return {k[:-1]: self.alphas[k[:-1]] / v.shape[-1] for k, v in flat.items() if k[-1] == "down"}

    @property
    def components(self) -> tuple[str, ...]:
        return tuple(self.params)


def target_modules(params: Any, targets: Sequence[str]) -> list[tuple[str, ...]]:
    """Module paths of the kernels whose torch name ends with one of ``targets`` (peft's suffix rule)."""
    out = []
    for path in _flat_target(params):
        if path[-1] != "kernel":
            continue
        name = flax_path_to_torch_key(path)[: -len(".weight")]
        if any(name == t or name.endswith("." + t) for t in targets):
            out.append(path[:-1])
    return sorted(out)


def init_lora(params: Mapping[str, Any], targets: Mapping[str, Sequence[str]], rank: int, alpha: float,
              key: jax.Array) -> Lora:  # fmt: skip
    """Fresh adapters as peft initializes them: ``down`` Kaiming-uniform (a=sqrt(5)), ``up`` zero, so W_eff = W."""
    out, alphas = {}, {}
    for ci, (comp, names) in enumerate(targets.items()):
        flat = _flat_target(params[comp])
        paths = target_modules(params[comp], names)
        if not paths:
            raise ValueError(f"LoRA targets {list(names)} match no kernel of the {comp}")
        for i, path in enumerate(paths):
            kernel = flat[path + ("kernel",)]
            fan_in = math.prod(kernel.shape[:-1])
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) = U(-1/sqrt(fan_in), 1/sqrt(fan_in))
            k = jax.random.fold_in(jax.random.fold_in(key, ci), i)
            out[(comp, *path, "down")] = jax.random.uniform(k, (*kernel.shape[:-1], rank), jnp.float32, -bound, bound)
            out[(comp, *path, "up")] = jnp.zeros((rank, kernel.shape[-1]), jnp.float32)
            alphas[(comp, *path)] = float(alpha)
    return Lora(traverse_util.unflatten_dict(out), alphas)


def lora_delta(down, up):
    """``down @ up`` over the last axis of ``down``: the kernel-shaped update (Dense or Conv)."""
    return jnp.tensordot(down.astype(jnp.float32), up.astype(jnp.float32), axes=1)


def apply_lora(params: Mapping[str, Any], lora_params: Mapping[str, Any], scales: Mapping[tuple[str, ...], float],
               scale: float = 1.0) -> dict:  # fmt: skip
    """``{component: params}`` with ``W + scale * s * down @ up`` on every adapted kernel; pure (jit-able).

    Only the adapted kernels are new arrays; every other leaf is passed through as is.
    """
    out = dict(params)
    for comp, tree in lora_params.items():
        if comp not in params:
            continue
        flat = traverse_util.flatten_dict(params[comp])
        lf = traverse_util.flatten_dict(tree)
        for path in {k[:-1] for k in lf}:
            kernel = flat[path + ("kernel",)]
            d = lora_delta(lf[path + ("down",)], lf[path + ("up",)])
            flat[path + ("kernel",)] = (kernel.astype(jnp.float32) + (scale * scales[(comp, *path)]) * d).astype(
                kernel.dtype
            )
        out[comp] = traverse_util.unflatten_dict(flat)
    return out


def merge_lora(params: Mapping[str, Any], lora: Lora, scale: float = 1.0) -> dict:
    """Fold ``lora`` into ``params`` at ``scale`` (``{component: params}``; components absent stay absent)."""
    return apply_lora(params, lora.params, lora.scales(), scale)


def unmerge_lora(params: Mapping[str, Any], lora: Lora, scale: float = 1.0) -> dict:
    """Undo :func:`merge_lora` (exact up to float rounding of the base weights' dtype)."""
    return apply_lora(params, lora.params, lora.scales(), -scale)
