"""LoRA tensor names <-> our parameter paths: diffusers/peft, kohya and kohya on the original SD layout.

Three namings are in use for the same low-rank pair (A: ``r x in``, B: ``out x r``):

- diffusers/peft (``pipe.save_lora_weights``): ``unet.<module>.lora_A.weight`` / ``lora_B.weight``,
  ``text_encoder.<module>...``; alpha lives in the ``lora_adapter_metadata`` JSON of the safetensors
  header (peft ``LoraConfig`` fields prefixed by the component: ``unet.r``, ``unet.lora_alpha``,
  ``unet.alpha_pattern``, ...). Without metadata, alpha equals the rank (scale 1), as diffusers assumes.
- kohya (community files): ``lora_unet_<module with "." -> "_">.lora_down.weight`` / ``lora_up.weight`` /
  ``alpha``, ``lora_te_`` (``lora_te1_``/``lora_te2_`` for SDXL's two encoders). Missing alpha: the rank.
- kohya on the original (CompVis) layout: ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``,
  mapped through :func:`sd_jax.convert.single_file.unet_keys`.

Kohya's underscored names are ambiguous to parse, so the map runs the other way: every kernel of our
parameter tree is given its names, and a tensor is looked up. A name that maps nowhere raises.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

import numpy as np
from flax import traverse_util

from sd_jax.convert.diffusers import _flat_target, flax_path_to_torch_key, torch_module_path
from sd_jax.errors import ShapeMismatchError, UnexpectedKeyError

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}  # fmt: skip
METADATA_KEY = "lora_adapter_metadata"  # diffusers ``LORA_ADAPTER_METADATA_KEY``
_PREFIXED = re.compile(r"(?P<comp>unet|text_encoder_2|text_encoder)\.(?P<rest>.+)")
# (pattern on the key after the component, replacement of the module name, slot): peft, then the two older
# diffusers spellings that ``convert_state_dict_to_peft`` still reads.
_DIFFUSERS_LEAVES = (
    (re.compile(r"(.+)\.lora_(A|B)\.weight"), r"\1", {"A": "A", "B": "B"}),
    (re.compile(r"(.+)\.(?:lora|lora_linear_layer)\.(down|up)\.weight"), r"\1", {"down": "A", "up": "B"}),
    (re.compile(r"(.+)\.processor\.(to_q|to_k|to_v)_lora\.(down|up)\.weight"), r"\1.\2", {"down": "A", "up": "B"}),
    (re.compile(r"(.+)\.processor\.to_out_lora\.(down|up)\.weight"), r"\1.to_out.0", {"down": "A", "up": "B"}),
    (re.compile(r"(.+)\.(?:to_)?(q|k|v|out)_lora\.(down|up)\.weight"), r"\1.\2_proj", {"down": "A", "up": "B"}),
)
_KOHYA = re.compile(r"(?P<name>lora_(?:unet|te|te1|te2)_\w+)\.(?P<leaf>lora_down\.weight|lora_up\.weight|alpha)")


def module_names(flat_params: Mapping[tuple[str, ...], Any]) -> dict[str, tuple[str, ...]]:
    """{torch module name: our module path} for every kernel (Linear or Conv) of one component."""
    out = {}
    for path in flat_params:
        if path[-1] == "kernel":
            out[flax_path_to_torch_key(path)[: -len(".weight")]] = path[:-1]
    return out


def kohya_names(component: str, flat_params, unet_config=None) -> dict[str, tuple[str, ...]]:
    """{kohya name: our module path}; for the U-Net also the original-layout (SGM) names when the config allows."""
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}[component]
    mods = module_names(flat_params)
    out = {prefix + name.replace(".", "_"): path for name, path in mods.items()}
    if component == "text_encoder":  # SDXL files call the first encoder te1
        out.update({"lora_te1_" + name.replace(".", "_"): path for name, path in mods.items()})
    if component == "unet" and unet_config is not None:
        from sd_jax.convert.single_file import unet_keys
        from sd_jax.errors import UnsupportedArchitectureError

        try:
            table = unet_keys(unet_config)
        except UnsupportedArchitectureError:
            table = {}
        for diffusers_key, original_key in table.items():
            name = diffusers_key[: -len(".weight")] if diffusers_key.endswith(".weight") else None
            if name in mods:
                out[prefix + original_key[: -len(".weight")].replace(".", "_")] = mods[name]
    return out


def parse_diffusers_key(key: str) -> tuple[str, str, str] | None:
    """``unet.<module>.lora_A.weight`` (or an older diffusers spelling) -> (component, torch module, "A"/"B")."""
    m = _PREFIXED.fullmatch(key)
    if not m:
        return None
    for pattern, module, slots in _DIFFUSERS_LEAVES:
        hit = pattern.fullmatch(m["rest"])
        if hit:
            name = hit.expand(module)
            if m["comp"] != "unet" and not name.startswith("text_model."):
                name = "text_model." + name  # transformers 5 flattened CLIPTextModel; our tree keeps text_model
            return m["comp"], name, slots[hit.groups()[-1]]
    return None


def _peft_alpha(meta: dict, component: str, module: str, rank: int) -> float:
    """alpha / rank scaling as peft's ``LoraLayer.update_layer`` computes it, returned as an equivalent alpha."""
    get = lambda k, d=None: meta.get(f"{component}.{k}", d)  # noqa: E731
    if get("r") is None and get("lora_alpha") is None:
        return float(rank)
    for unsupported in ("use_dora",):
        if get(unsupported):
            raise UnexpectedKeyError(f"LoRA metadata: {component}.{unsupported}=true (DoRA) is not supported")

    def pattern(table, default):
        for key, value in (table or {}).items():  # peft ``get_pattern_key``
            if re.match(rf"(.*\.)?({key})$", module):
                return value
        return default

    r = pattern(get("rank_pattern"), get("r", rank))
    alpha = float(pattern(get("alpha_pattern"), get("lora_alpha", r)))
    if int(r) != rank:
        raise ShapeMismatchError(f"LoRA {component}.{module}: metadata says rank {r} but lora_A has rank {rank}")
    if get("use_rslora"):  # scale alpha / sqrt(r), expressed as an alpha for alpha / r
        alpha = alpha * rank / np.sqrt(rank)
    return alpha


def _to_flax(a: np.ndarray, b: np.ndarray, kernel_shape: tuple[int, ...], key: str):
    """torch A (r, in[, kh, kw]), B (out, r[, 1, 1]) -> our down (in, r) or HWIO (kh, kw, in, r), up (r, out)."""
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    r = a.shape[0]
    if b.ndim not in (2, 4) or b.shape[1] != r or b.shape[2:] not in ((), (1, 1)):
        raise ShapeMismatchError(f"LoRA {key}: up/B {b.shape} does not fit down/A {a.shape}")
    up = b.reshape(b.shape[0], r).T
    down = a.T if a.ndim == 2 else a.transpose(2, 3, 1, 0) if a.ndim == 4 else None
    want = (*down.shape[:-1], up.shape[1]) if down is not None else None
    if want != tuple(kernel_shape):
        raise ShapeMismatchError(
            f"LoRA {key}: A {a.shape} / B {b.shape} make a {want} update, but our kernel is {tuple(kernel_shape)}"
        )
    return down, up


def _to_torch(down: np.ndarray, up: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of :func:`_to_flax`."""
    down, up = np.asarray(down), np.asarray(up)
    if down.ndim == 2:
        return down.T, up.T
    return down.transpose(3, 2, 0, 1), up.T.reshape(up.shape[1], up.shape[0], 1, 1)


def lora_from_state_dict(state: Mapping[str, np.ndarray], metadata: dict | None, params: Mapping[str, Any], *,
                         unet_config=None, source: str = "LoRA") -> tuple[dict, dict]:  # fmt: skip
    """A LoRA state dict (any naming above) -> (``{component: {module...: {"down", "up"}}}``, ``{path: alpha}``).

    ``params`` holds the base parameter trees (``{"unet": ..., "text_encoder": ...}``) that names and shapes are
    checked against; ``metadata`` is the safetensors ``__metadata__``. Every tensor must be used.
    """
    meta = json.loads(metadata[METADATA_KEY]) if metadata and METADATA_KEY in metadata else {}
    flat = {c: _flat_target(p) for c, p in params.items()}
    kohya: dict[str, tuple[str, tuple[str, ...]]] = {}
    if any(k.startswith("lora_") for k in state):
        for c in flat:
            kohya.update({n: (c, p) for n, p in kohya_names(c, flat[c], unet_config).items()})
    pairs: dict[tuple[str, ...], dict[str, Any]] = {}
    unknown = []
    for key, value in state.items():
        parsed = parse_diffusers_key(key)
        if parsed and parsed[0] in flat:
            comp, module, slot = parsed
            path = torch_module_path(module + ".weight")[0]
            if path + ("kernel",) not in flat[comp]:
                unknown.append(key)
                continue
            pairs.setdefault((comp, *path), {"name": f"{comp}.{module}", "peft": module})[slot] = value
            continue
        m = _KOHYA.fullmatch(key)
        if m and m["name"] in kohya:
            comp, path = kohya[m["name"]]
            slot = {"lora_down.weight": "A", "lora_up.weight": "B", "alpha": "alpha"}[m["leaf"]]
            pairs.setdefault((comp, *path), {"name": m["name"]})[slot] = value
            continue
        unknown.append(key)
    if unknown:
        listed = "\n  ".join(sorted(unknown)[:20])
        more = f"\n  ... and {len(unknown) - 20} more" if len(unknown) > 20 else ""
        raise UnexpectedKeyError(
            f"{source}: {len(unknown)} LoRA tensor(s) map to no layer of this model (other base model, or an "
            f"unsupported kind such as LoHa/LoKr/DoRA?):\n  {listed}{more}"
        )
    out: dict[tuple[str, ...], np.ndarray] = {}
    alphas: dict[tuple[str, ...], float] = {}
    for full, p in pairs.items():
        if "A" not in p or "B" not in p:
            raise UnexpectedKeyError(f"{source}: {p['name']} has only its {'down/A' if 'A' in p else 'up/B'} half")
        comp, path = full[0], full[1:]
        down, up = _to_flax(p["A"], p["B"], flat[comp][path + ("kernel",)].shape, f"{source}: {p['name']}")
        rank = down.shape[-1]
        if "alpha" in p:
            alpha = np.asarray(p["alpha"], np.float32)
            if alpha.size != 1:
                raise ShapeMismatchError(f"{source}: {p['name']}.alpha has shape {alpha.shape}, expected a scalar")
            alphas[full] = float(alpha.reshape(()))
        else:
            alphas[full] = _peft_alpha(meta, comp, p["peft"], rank) if "peft" in p else float(rank)
        out[full + ("down",)], out[full + ("up",)] = down, up
    return traverse_util.unflatten_dict(out), alphas


def _pattern_table(values: dict[str, float]) -> tuple[float, dict[str, float]]:
    """The most common value and {escaped module name: value} for the others, as peft's patterns."""
    common = max(set(values.values()), key=list(values.values()).count)
    return common, {re.escape(k): v for k, v in values.items() if v != common}


def lora_to_state_dict(lora_params: Mapping[str, Any], alphas: Mapping[tuple[str, ...], float], *,
                       naming: str = "diffusers") -> tuple[dict[str, np.ndarray], dict[str, str]]:  # fmt: skip
    """Our LoRA -> (tensors, safetensors metadata): diffusers/peft names + ``lora_adapter_metadata``, or kohya
    names with ``.alpha`` tensors (``naming="kohya"``)."""
    tensors: dict[str, np.ndarray] = {}
    meta: dict[str, Any] = {}
    per_comp: dict[str, dict[str, tuple[int, float]]] = {}
    flat = traverse_util.flatten_dict(dict(lora_params))
    for full in sorted({k[:-1] for k in flat}):
        comp, path = full[0], full[1:]
        a, b = _to_torch(np.asarray(flat[full + ("down",)], np.float32), np.asarray(flat[full + ("up",)], np.float32))
        module = flax_path_to_torch_key(path + ("kernel",))[: -len(".weight")]
        if naming == "kohya":
            name = {"unet": "lora_unet_", "text_encoder": "lora_te_", "text_encoder_2": "lora_te2_"}[comp]
            name += module.replace(".", "_")
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = a, b
            tensors[f"{name}.alpha"] = np.asarray(alphas[full], np.float32)
        elif naming == "diffusers":
            tensors[f"{comp}.{module}.lora_A.weight"], tensors[f"{comp}.{module}.lora_B.weight"] = a, b
            # peft matches names by suffix; without "text_model." they fit old and flattened CLIPTextModels
            per_comp.setdefault(comp, {})[module.removeprefix("text_model.")] = (a.shape[0], float(alphas[full]))
        else:
            raise ValueError(f"naming must be 'diffusers' or 'kohya', got {naming!r}")
    for comp, mods in per_comp.items():
        r, rank_pattern = _pattern_table({m: v[0] for m, v in mods.items()})
        alpha, alpha_pattern = _pattern_table({m: v[1] for m, v in mods.items()})
        meta.update({f"{comp}.r": int(r), f"{comp}.lora_alpha": alpha, f"{comp}.rank_pattern": rank_pattern,
                     f"{comp}.alpha_pattern": alpha_pattern, f"{comp}.target_modules": sorted(mods),
                     f"{comp}.use_dora": False, f"{comp}.use_rslora": False, f"{comp}.lora_bias": False})  # fmt: skip
    return tensors, ({METADATA_KEY: json.dumps(meta, indent=2, sort_keys=True)} if meta else {})
