"""Fine-tune Stable Diffusion 2.1 (768, v-prediction) with FSDP over a pod slice or GPU node.

python train.py --config configs/sd21_finetune.py --workdir runs/sd21 --config.data.path=/data/my_images
"""

from configs import common, sd15_finetune


def get_config(arg=None):
    common.parse_arg(arg)  # no variants
    c = sd15_finetune.get_config()
    c.init_from = "stabilityai/stable-diffusion-2-1"
    c.data.image_size = 768
    # prediction_type stays "": v_prediction comes from 2.1's scheduler config (epsilon for 2.1-base)
    c.objective.zero_snr = False  # True + trailing timesteps at sampling: Lin et al. 2023
    c.mesh.data, c.mesh.fsdp = 1, -1
    c.sharding = "fsdp"
    return c
