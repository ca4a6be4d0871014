"""Shipped ControlNet configs and tiny single-file ControlNets in lllyasviel's original layout.

Needs the reference extra (torch, diffusers). Two steps:

1. ``sd_jax/model_configs/controlnet_{sd15,sd21,sdxl}/config.json``: diffusers'
   ``ControlNetModel.from_unet`` of the shipped real U-Net configs (built on torch's meta device).
   For SD 1.5 that is lllyasviel/control_v11p_sd15_* and for SDXL diffusers/controlnet-canny-sdxl-1.0.
2. ``tests/fixtures/controlnet/single_file/``: a tiny ControlNet per base (``from_unet`` of the
   tiny fixture U-Nets, with the original layout's 4 hint-encoder levels, weights perturbed and
   rounded to fp16 values), saved as a diffusers folder ``<base>/`` and, through
   ``sd_jax.loading.controlnet.save_controlnet_single_file``, as fp16 single files
   ``<base>.safetensors`` (``control_model.`` prefix) and ``<base>_noprefix.safetensors``.
   diffusers' ``ControlNetModel.from_single_file(file, config=<folder>)`` must read each file to
   the folder's tensors, so the layout is diffusers' reading of it, not only ours. (diffusers does
   not convert SDXL's ``label_emb``; for SDXL the check covers every other tensor.)

    python tools/make_controlnet_single_file_fixtures.py
"""

from __future__ import annotations

import json
import pathlib

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "sd_jax" / "model_configs"
OUT = ROOT / "tests" / "fixtures" / "controlnet" / "single_file"
SHIPPED = {"controlnet_sd15": "sd15", "controlnet_sd21": "sd21", "controlnet_sdxl": "sdxl_base"}
TINY = {"sd1": 21, "sdxl": 23}  # base fixture -> seed
HINT = (4, 8, 8, 16)  # four levels, as cldm's input_hint_block always has


def write_shipped_configs() -> None:
    from diffusers import ControlNetModel, UNet2DConditionModel

    for name, unet in SHIPPED.items():
        cfg = json.loads((CONFIGS / unet / "unet" / "config.json").read_text())
        with torch.device("meta"):
            net = ControlNetModel.from_unet(UNet2DConditionModel.from_config(cfg), load_weights_from_unet=False)
        out = {k: v for k, v in dict(net.config).items() if not k.startswith("_")}
        out = {"_class_name": "ControlNetModel", "_diffusers_version": cfg.get("_diffusers_version"), **out}
        (CONFIGS / name).mkdir(exist_ok=True)
        (CONFIGS / name / "config.json").write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
        print(f"{name}: {sum(p.numel() for p in net.parameters()):,} parameters")


def build(base: str, seed: int) -> pathlib.Path:
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(ROOT / "tests" / "fixtures" / base / "unet")
    torch.manual_seed(seed)
    net = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=HINT)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in net.named_parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
            p.copy_(p.half().float())  # fp16 files then hold exactly the folder's values
    net.eval().save_pretrained(OUT / base)
    return OUT / base


def write_single_files(folder: pathlib.Path) -> list[pathlib.Path]:
    import numpy as np

    from sd_jax.loading.controlnet import load_controlnet, save_controlnet_single_file

    config, params = load_controlnet(folder)
    files = []
    for tag, prefix in (("", "control_model."), ("_noprefix", "")):
        path = OUT / f"{folder.name}{tag}.safetensors"
        files.append(save_controlnet_single_file(path, config, params, prefix=prefix, dtype=np.float16))
    return files


def verify(folder: pathlib.Path, file: pathlib.Path) -> None:
    from diffusers import ControlNetModel

    want = ControlNetModel.from_pretrained(folder).state_dict()
    skip = [k for k in want if k.startswith("add_embedding.")]  # diffusers leaves SDXL's label_emb unconverted
    kw = {"low_cpu_mem_usage": False} if skip else {}  # ... so those stay at their random init instead of meta
    got = ControlNetModel.from_single_file(file, config=str(folder), torch_dtype=torch.float32, **kw).state_dict()
    assert set(got) == set(want), sorted(set(got) ^ set(want))
    for k in want:
        if k not in skip:
            assert torch.equal(got[k].float(), want[k].float()), k
    print(f"{file.relative_to(ROOT)}: diffusers from_single_file == folder ({len(want) - len(skip)} tensors)")


if __name__ == "__main__":
    write_shipped_configs()
    OUT.mkdir(parents=True, exist_ok=True)
    for base, seed in TINY.items():
        folder = build(base, seed)
        for f in write_single_files(folder):
            verify(folder, f)
