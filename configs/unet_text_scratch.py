"""Train the U-Net and the CLIP text encoder jointly from scratch (the VAE frozen, e.g. from vae_scratch).

python train.py --config configs/unet_text_scratch.py --workdir runs/unet
"""

from configs import common


def get_config(arg=None):
    common.parse_arg(arg)  # no variants
    c = common.get_config()
    c.train = ("unet", "text_encoder")
    c.steps = 5000
    c.optim.lr = 3e-4
    return c
