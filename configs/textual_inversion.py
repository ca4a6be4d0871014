"""Textual inversion (Gal et al. 2022): a new token's embedding rows learned on a frozen model.

python train.py --config configs/textual_inversion.py --workdir runs/ti \
    --config.init_from=/data/stable-diffusion-v1-5 --config.data.path=/data/my_cat \
    --config.textual_inversion.token='<my-cat>' --config.textual_inversion.initializer_token=cat
python train.py --config configs/textual_inversion.py:runlocal --workdir runs/ti_tiny     # CPU smoke run
python sample.py --model /data/stable-diffusion-v1-5 --embedding runs/ti/learned_embeds.safetensors \
    --prompt "a photo of <my-cat> on the beach"

The captions of data.path must hold the token (e.g. "a photo of <my-cat>"), or textual_inversion.prompt replaces
them all (as diffusers' example trains on templates). Only the token's num_vectors rows of
each text encoder's embedding table train (initialized from initializer_token's row, as diffusers'
examples/textual_inversion); everything else is frozen. The result, WORKDIR/learned_embeds.safetensors, is
diffusers' layout ({token: [num_vectors, width]}; SDXL: clip_l / clip_g), which diffusers and sample.py load.

The embedded model's held-out-combination demo (teach "<sjx>", then count with the oracle how often "<sjx>" alone
draws it): python -m sd_jax.evaluation.textual_inversion
"""

import pathlib

import ml_collections

from configs import common

FIXTURE = str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sd1")


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False, shapes=False)
    c = common.get_config()
    c.trainer = "textual_inversion"
    c.init_from = "runwayml/stable-diffusion-v1-5"  # the frozen base
    c.train = ("text_encoder",)  # the encoders whose tables grow (SDXL: both, whatever this says)
    c.textual_inversion = ml_collections.ConfigDict()
    c.textual_inversion.token = "<concept>"
    c.textual_inversion.initializer_token = "object"  # one existing token: the new rows start as its row
    c.textual_inversion.num_vectors = 1  # > 1: tokens <concept>, <concept>_1, ... (diffusers' multi-vector)
    c.textual_inversion.prompt = ""  # set (e.g. "a photo of <concept>"): every image trains on it, not its caption
    c.steps = 3000
    c.batch_size = 4
    c.data.source = "folder"
    c.data.image_size = 512
    c.data.caption_dropout = 0.0
    c.objective.min_snr_gamma = None
    c.optim.lr = 5e-3  # diffusers' example: 5e-4 x batch 4 x grad-accum 4 (scale_lr)
    c.optim.warmup_steps = 0
    c.optim.lr_schedule = "constant"
    c.optim.weight_decay = 1e-2
    c.optim.ema_decay = 0.0  # off: the rows themselves are written
    c.log_every = 10
    c.checkpoint_every = 500
    if arg.shapes:
        shapes(c)
    if arg.runlocal:
        runlocal(c)
    return c


def shapes(c):
    """The embedded default model (its tokenizer knows "circle"); the data is given by the caller
    (:class:`sd_jax.evaluation.textual_inversion.ConceptSource`)."""
    from sd_jax.embedded import default_model_path

    c.init_from = str(default_model_path())
    c.textual_inversion.token = "<sjx>"
    c.textual_inversion.initializer_token = "circle"
    c.textual_inversion.prompt = "<sjx>"
    c.data.source = "synthetic"  # placeholder: the concept images come from the evaluation's source
    c.data.image_size = 64
    c.batch_size = 8
    c.steps = 300
    c.optim.lr = 2e-2
    c.log_every = 25
    c.checkpoint_every = 1000


def runlocal(c):
    """A CPU smoke run on the tiny test fixture (synthetic colour fields, all trained as "a <tiny> picture")."""
    c.init_from = FIXTURE
    c.textual_inversion.token = "<tiny>"
    c.textual_inversion.initializer_token = "red"
    c.textual_inversion.prompt = "a <tiny> picture"
    c.steps = 10
    c.batch_size = 2
    c.data.source = "synthetic"
    c.data.image_size = 32
    c.optim.lr = 1e-2
    c.log_every = 1
    c.checkpoint_every = 5
