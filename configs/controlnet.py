"""A ControlNet on a frozen base model. By default: the embedded shapes ControlNet, trained on the embedded model
with the shape's silhouette as its control (position, size and shape from the control; colours from the prompt).

python train.py --config configs/controlnet.py --workdir runs/shapes_controlnet     # writes WORKDIR/controlnet
python train.py --config configs/controlnet.py:runlocal --workdir /tmp/cn_smoke      # a few steps (CI smoke)

Any base and data set with conditioning images (a TFDS feature) or edges computed on the fly::

python train.py --config configs/controlnet.py --workdir runs/cn --config.init_from=PATH_OR_HUB_ID \\
    --config.data.source=tfds --config.data.tfds_name=NAME --config.data.control=canny --config.data.image_size=512

``data.control``: ``column`` (with ``data.control_key``, the data set's conditioning-image feature), ``canny`` or
``silhouette`` ("shapes" only). ``controlnet.init_from`` continues an existing ControlNet instead of copying the
U-Net's encoder.
"""

import ml_collections

from configs import common
from sd_jax.embedded import default_model_path


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    c = common.get_config()
    c.trainer = "controlnet"
    c.train = ("controlnet",)
    c.init_from = str(default_model_path() or "sd_jax/default_model")
    c.controlnet = ml_collections.ConfigDict(
        # hint encoder widths; their count sets its downsampling (2 ** (n - 1)): the VAE's factor, 4 here, 8 for SD
        {"init_from": "", "conditioning_channels": 3, "conditioning_embedding_out_channels": (16, 32, 64)}
    )
    c.steps = 5500
    c.batch_size = 16
    c.data.source = "shapes"
    c.data.image_size = 64
    c.data.num_train = 50_000
    c.data.control = "silhouette"
    c.data.control_key = ""
    c.data.caption_dropout = 0.1  # ControlNet learns to follow the control without a prompt too
    c.objective.prediction_type = ""  # the base model's
    c.objective.min_snr_gamma = 5.0
    c.optim.lr = 5e-4
    c.optim.warmup_steps = 50
    c.optim.ema_decay = 0.0
    c.optim.weight_decay = 0.0
    c.log_every = 50
    c.checkpoint_every = 250
    c.export_dtype = "float16"
    if arg.runlocal:
        c.steps, c.batch_size, c.log_every, c.checkpoint_every = 3, 4, 1, 3
        c.data.num_train = 64
    return c
