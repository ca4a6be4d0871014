"""Train the VAE alone from scratch (L1 + KL), e.g. on an image folder.

python train.py --config configs/vae_scratch.py --workdir runs/vae --config.data.source=folder --config.data.path=DIR
"""

from configs import common


def get_config(arg=None):
    common.parse_arg(arg)  # no variants
    c = common.get_config()
    c.train = ("vae",)
    c.model.vae.update({"block_out_channels": (32, 64, 64), "layers_per_block": 1, "norm_num_groups": 8})
    c.objective.vae_loss = "l1"
    c.objective.kl_weight = 1e-6
    c.optim.lr = 2e-4
    c.steps = 2000
    return c
