"""A tiny CPU smoke run: a small U-Net trained (with frozen tiny VAE and text encoder) on synthetic data.

python train.py --config configs/tiny.py --workdir runs/tiny
python train.py --config configs/tiny.py --workdir runs/tiny --config.steps=50 --config.sharding=fsdp
"""

import ml_collections


def get_config():
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = None  # a diffusers folder to fine-tune from
    c.train = ("unet",)  # components with gradients: ("unet",), ("unet", "text_encoder") or ("vae",)
    c.steps = 20
    c.batch_size = 8
    c.compute_dtype = "float32"  # "bfloat16": bf16 compute, fp32 master weights
    c.remat_policy = None  # e.g. "nothing_saveable" to rematerialize U-Net blocks
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding = "dp"  # "dp", "fsdp" or "fsdp_tp" logical-axis rule presets

    c.model = ml_collections.ConfigDict()
    c.model.unet = ml_collections.ConfigDict({"sample_size": 8, "cross_attention_dim": 32})
    c.model.vae = ml_collections.ConfigDict({})
    c.model.text = ml_collections.ConfigDict({"vocab_size": 49408})  # the real CLIP tokenizer's ids

    c.data = ml_collections.ConfigDict()
    c.data.source = "synthetic"  # "folder" (metadata.jsonl / .txt captions) or "tfds" (a prepared TFDS dataset)
    c.data.path = ""  # folder: the image folder
    c.data.data_dir = ""  # TFDS data_dir; folder: where it is prepared (default WORKDIR/tfds)
    c.data.tfds_name = ""  # tfds: a registered or prepared dataset name, e.g. "my_dataset/config:1.0.0"
    c.data.split = "train"
    c.data.image_key = ""  # default: the first Image feature
    c.data.text_key = ""  # default: the first Text feature, else the first ClassLabel
    c.data.caption_template = "a photo of a {name}"  # captions from ClassLabel names
    c.data.workers = 8  # threads decoding images
    c.data.cache = ""  # a latent/text-embedding cache (python -m sd_jax.training.cache): skips VAE and text encoder
    c.data.image_size = 32
    c.data.caption_dropout = 0.1  # trains the unconditional branch for CFG
    c.data.random_crop = False
    c.data.random_flip = True
    c.data.seed = 0

    c.objective = ml_collections.ConfigDict()
    c.objective.prediction_type = "epsilon"  # or "v_prediction"
    c.objective.min_snr_gamma = 5.0  # None to turn off
    c.objective.offset_noise = 0.0
    c.objective.zero_snr = False
    c.objective.vae_loss = "l1"
    c.objective.kl_weight = 1e-6

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5
    c.optim.lr_schedule = "cosine"
    c.optim.steps = c.get_ref("steps")
    c.optim.weight_decay = 1e-2
    c.optim.clip_norm = 1.0
    c.optim.grad_accum = 1
    c.optim.ema_decay = 0.999
    c.optim.ema_warmup = False  # True: diffusers EMAModel's decay warmup, min(decay, (1 + step) / (10 + step))
    c.optim.freeze = ()  # "/"-joined param path prefixes held fixed, e.g. ("vae/encoder", "vae/quant_conv")

    c.log_every = 5
    c.progress_bar = True
    c.sample_every = 0  # > 0: sample_prompts as a grid in WORKDIR/samples/step_N.png and TensorBoard
    c.sample_prompts = ("a red picture", "a green picture", "a blue picture", "a white picture")
    c.sample_steps = 20
    c.sample_guidance = 7.5
    c.sample_size = 0  # default: data.image_size
    c.sample_seed = 0
    c.sample_ema = True  # sample with the EMA weights when there are some
    c.checkpoint_every = 10
    c.keep_checkpoints = 3
    return c
