"""Fine-tune Stable Diffusion 1.5 on an image folder, sized for a TPU v4-32 pod slice or an 8-GPU node.

    python train.py --config configs/sd15_finetune.py --workdir gs://bucket/runs/sd15 \
        --config.init_from=/data/stable-diffusion-v1-5 --config.data.path=/data/my_images
"""

from configs import common


def get_config(arg=None):
    common.parse_arg(arg)  # no variants
    c = common.get_config()
    c.init_from = "runwayml/stable-diffusion-v1-5"  # a diffusers folder or Hub id
    c.train = ("unet",)
    c.steps = 20_000
    c.batch_size = 256
    c.compute_dtype = "bfloat16"  # fp32 master weights, bf16 activations
    c.remat_policy = "nothing_saveable"
    c.mesh.data, c.mesh.fsdp = -1, 1
    c.sharding = "dp"  # "fsdp" when the optimizer state does not fit one device
    c.data.source = "folder"
    c.data.path = ""
    c.data.image_size = 512
    c.data.random_crop = True
    c.objective.prediction_type = ""  # "": from the checkpoint's scheduler config
    c.objective.min_snr_gamma = 5.0
    c.objective.offset_noise = 0.05
    c.optim.lr = 1e-5
    c.optim.warmup_steps = 500
    c.optim.lr_schedule = "constant"
    c.optim.ema_decay = 0.9999
    c.optim.ema_warmup = True  # as diffusers EMAModel (train_text_to_image --use_ema)
    c.log_every = 50
    c.checkpoint_every = 1000
    return c
