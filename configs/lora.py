"""LoRA fine-tuning of a frozen Stable Diffusion on an image folder (adapters on the attention projections).

python train.py --config configs/lora.py --workdir runs/lora \
    --config.init_from=/data/stable-diffusion-v1-5 --config.data.path=/data/my_images
python train.py --config configs/lora.py:runlocal --workdir runs/lora_tiny        # CPU smoke run on the test fixture
python sample.py --model /data/stable-diffusion-v1-5 --lora runs/lora/pytorch_lora_weights.safetensors:0.8 \
    --prompt "a photo in the trained style"

Add text-encoder adapters with --config.train='("unet","text_encoder")'. The result,
WORKDIR/pytorch_lora_weights.safetensors, is in diffusers/peft naming (diffusers' load_lora_weights reads it).
"""

import pathlib

import ml_collections

from configs import common

FIXTURE = str(pathlib.Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "sd1")


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    c = common.get_config()
    c.trainer = "lora"
    c.init_from = "runwayml/stable-diffusion-v1-5"  # the frozen base: a diffusers folder, single file or Hub id
    c.train = ("unet",)  # adapted components: ("unet",) or ("unet", "text_encoder")
    c.lora = ml_collections.ConfigDict()
    c.lora.rank = 4
    c.lora.alpha = 4.0  # the update is scaled by alpha / rank
    c.lora.unet_targets = ("to_q", "to_k", "to_v", "to_out.0")  # module-name suffixes, as peft target_modules
    c.lora.text_targets = ("q_proj", "k_proj", "v_proj", "out_proj")
    c.steps = 1000
    c.batch_size = 8
    c.compute_dtype = "bfloat16"
    c.data.source = "folder"
    c.data.path = ""
    c.data.image_size = 512
    c.data.caption_dropout = 0.0
    c.objective.min_snr_gamma = None
    c.optim.lr = 1e-4
    c.optim.warmup_steps = 0
    c.optim.lr_schedule = "constant"
    c.optim.weight_decay = 1e-2
    c.optim.ema_decay = 0.0  # off: the adapters themselves are written
    c.log_every = 10
    c.checkpoint_every = 250
    if arg.runlocal:
        runlocal(c)
    return c


def runlocal(c):
    """A CPU smoke run on the tiny test fixture (synthetic data unless data.path is given)."""
    c.init_from = FIXTURE
    c.steps = 10
    c.batch_size = 2
    c.compute_dtype = "float32"
    c.data.source = "synthetic"
    c.data.image_size = 32
    c.optim.lr = 1e-2
    c.log_every = 1
    c.checkpoint_every = 5
