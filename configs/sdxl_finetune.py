"""Fine-tune SDXL base 1.0 at 1024 px: FSDP, bf16 compute with fp32 master weights, U-Net remat.

Sized for an 8-GPU node (80 GB each) or a TPU v4-32 pod slice: fp32 U-Net params, Adam moments and EMA
(~41 GB) are sharded over every device; 8 images per GPU at 1024 px.

    python train.py --config configs/sdxl_finetune.py --workdir runs/sdxl \
        --config.init_from=/data/stable-diffusion-xl-base-1.0 --config.data.path=/data/my_images
    python train.py --config configs/sdxl_finetune.py:runlocal --workdir runs/sdxl_tiny   # CPU smoke run

Both text encoders stay frozen unless named: ``--config.train='("unet","text_encoder","text_encoder_2")'``.
Random crops are recorded and conditioned on (SDXL's original-size / crop / target-size ``time_ids``).
"""

from configs import common, sd15_finetune


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    c = sd15_finetune.get_config()
    c.init_from = "stabilityai/stable-diffusion-xl-base-1.0"  # a diffusers folder or Hub id
    c.train = ("unet",)
    c.batch_size = 64
    c.compute_dtype = "bfloat16"
    c.remat_policy = "nothing_saveable"
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.sharding = "fsdp"
    c.data.image_size = 1024
    c.data.random_crop = True
    c.objective.prediction_type = ""  # "": from the checkpoint's scheduler config (epsilon for SDXL base)
    c.optim.lr = 4e-6  # below SD 1.5's: a 2.6B-parameter U-Net
    if arg.runlocal:  # the tiny SDXL test fixture on synthetic data, a few CPU seconds per step
        c.init_from = "tests/fixtures/sdxl"
        c.steps = 10
        c.batch_size = 8
        c.compute_dtype = "float32"
        c.data.source = "synthetic"
        c.data.image_size = 32
        c.data.random_crop = False
        c.optim.lr = 1e-3
        c.optim.warmup_steps = 1
        c.optim.ema_decay = 0.99
        c.log_every = 1
        c.checkpoint_every = 5
    return c
