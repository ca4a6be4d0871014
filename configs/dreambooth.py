"""DreamBooth (Ruiz et al. 2023) with LoRA: a subject from a few photos, bound to a rare token, with prior
preservation on class images sampled from the frozen model when the class folder has too few.

python train.py --config configs/dreambooth.py --workdir runs/dog \
    --config.init_from=/data/stable-diffusion-v1-5 --config.data.path=/data/dog_photos \
    --config.data.instance_prompt="a photo of sks dog" --config.data.class_prompt="a photo of a dog" \
    --config.data.class_path=runs/dog_class_images
python train.py --config configs/dreambooth.py:runlocal --workdir runs/db_tiny --config.data.path=/data/dog_photos
python sample.py --model /data/stable-diffusion-v1-5 --lora runs/dog/pytorch_lora_weights.safetensors \
    --prompt "a photo of sks dog on the beach"
"""

from configs import common, lora


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    c = lora.get_config()
    c.data.source = "dreambooth"
    c.data.path = ""  # the instance images (captions, if any, are ignored)
    c.data.instance_prompt = "a photo of sks dog"
    c.data.with_prior_preservation = True
    c.data.class_path = ""  # created and filled up to num_class_images with samples of class_prompt
    c.data.class_prompt = "a photo of a dog"
    c.data.num_class_images = 100
    c.data.class_batch_size = 4
    c.data.class_sample_steps = 25
    c.data.random_flip = False
    c.objective.prior_loss_weight = 1.0
    c.steps = 400
    c.batch_size = 1  # instance images per step; prior preservation adds as many class images
    c.optim.lr = 1e-4
    c.checkpoint_every = 100
    if arg.runlocal:
        lora.runlocal(c)
        c.data.source = "dreambooth"
        c.data.num_class_images = 2
        c.data.class_batch_size = 2
        c.data.class_sample_steps = 2
        c.steps = 4
    return c
