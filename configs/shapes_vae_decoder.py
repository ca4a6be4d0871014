"""The embedded model, stage 1b: the stage-1 VAE's decoder fine-tuned alone with an L2 loss (PSNR is an L2
measure); the encoder, and so the latents the U-Net is trained on, stay bit-identical.

python train.py --config configs/shapes_vae_decoder.py --workdir runs/shapes_vae_decoder
python train.py --config configs/shapes_vae_decoder.py --workdir runs/shapes_vae_decoder \
    --export runs/shapes_vae_decoder/export
python train.py --config configs/shapes_vae_decoder.py:runlocal --workdir /tmp/dec_smoke   # a few steps (CI smoke)
"""

import ml_collections

from configs import common, shapes_vae


def get_config(arg=None):
    c = shapes_vae.get_config(arg)  # its runlocal shrinks the run too
    arg = common.parse_arg(arg, runlocal=False)
    c.init_components = ml_collections.ConfigDict({"vae": "runs/shapes_vae/export"})
    c.optim.freeze = ("vae/encoder", "vae/quant_conv")
    c.objective.vae_loss = "l2"
    c.steps = 1000
    c.optim.lr = 3e-4
    c.optim.warmup_steps = 50
    if arg.runlocal:
        c.steps = 3
        c.init_components = ml_collections.ConfigDict({})
    return c
