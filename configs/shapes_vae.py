"""The embedded model, stage 1: the VAE (factor 4, 4 latent channels) on the "shapes" data set, from scratch.

python train.py --config configs/shapes_vae.py --workdir runs/shapes_vae
python train.py --config configs/shapes_vae.py --workdir runs/shapes_vae --export runs/shapes_vae/export
python train.py --config configs/shapes_vae.py:runlocal --workdir /tmp/vae_smoke   # a few steps (CI smoke)
"""

from configs import common


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    c = common.get_config()
    c.train = ("vae",)
    c.steps = 2500
    c.batch_size = 16
    c.model.vae.update({"block_out_channels": (16, 32, 64), "layers_per_block": 1, "norm_num_groups": 8,
                        "sample_size": 64})  # fmt: skip
    c.data.source = "shapes"
    c.data.image_size = 64
    c.data.num_train = 50_000
    c.data.data_dir = ""  # default ~/.cache/sd_jax/tfds
    c.data.caption_dropout = 0.0
    c.objective.vae_loss = "l1"
    c.objective.kl_weight = 1e-6
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.0  # the VAE ships its raw weights
    c.log_every = 25
    c.checkpoint_every = 250
    c.export_dtype = "float16"
    if arg.runlocal:
        c.steps, c.batch_size, c.log_every, c.checkpoint_every = 3, 8, 1, 3
        c.data.num_train = 64
    return c
