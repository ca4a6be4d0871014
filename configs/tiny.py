"""A tiny CPU smoke run: a small U-Net trained (with frozen tiny VAE and text encoder) on synthetic data.

python train.py --config configs/tiny.py --workdir runs/tiny
python train.py --config configs/tiny.py --workdir runs/tiny --config.steps=50 --config.sharding=fsdp

No other config starts from this one: they start from ``configs/common.py``.
"""

from configs import common


def get_config(arg=None):
    common.parse_arg(arg)  # no variants: refuses any argument
    c = common.get_config()
    # What makes it a smoke run, stated here though common.py holds the same numbers today.
    c.steps = 20
    c.batch_size = 8
    c.model.unet.update({"sample_size": 8, "cross_attention_dim": 32})  # over UNetConfig.tiny()
    c.data.source = "synthetic"
    c.data.image_size = 32
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5
    c.log_every = 5
    c.checkpoint_every = 10
    return c
