"""The embedded model, stage 2: U-Net and CLIP text encoder trained jointly from scratch on "shapes",
with the stage-1 VAE frozen (``init_components.vae``).

python train.py --config configs/shapes_unet.py --workdir runs/shapes_unet
python train.py --config configs/shapes_unet.py --workdir runs/shapes_unet --export sd_jax/default_model
python train.py --config configs/shapes_unet.py:runlocal --workdir /tmp/unet_smoke   # a few steps (CI smoke)
"""

import ml_collections

from configs import common, shapes_vae


def get_config(arg=None):
    arg = common.parse_arg(arg, runlocal=False)
    c = common.get_config()
    c.train = ("unet", "text_encoder")
    c.steps = 7800
    c.batch_size = 32
    c.init_components = ml_collections.ConfigDict({"vae": "runs/shapes_vae_decoder/export"})
    c.model.vae = shapes_vae.get_config().model.vae  # used only when no trained VAE is given (runlocal)
    # 16 positions: the longest caption is 9 tokens with BOS/EOS, and 77 would spend ~30% of the step on padding
    c.model.text = ml_collections.ConfigDict({"vocab_size": 49408, "hidden_size": 128, "intermediate_size": 512,
                                              "num_hidden_layers": 3, "num_attention_heads": 4,
                                              "max_position_embeddings": 16})  # fmt: skip
    c.model.unet = ml_collections.ConfigDict(
        {
            "sample_size": 16,
            "block_out_channels": (32, 64, 128),
            # attention at 8x8 and 4x4 only (as SDXL skips its highest resolution): 16x16 self-attention was
            # a third of the step
            "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            "layers_per_block": (1, 1, 1),
            "attention_heads": (2, 4, 4),
            "transformer_layers_per_block": (1, 1, 1),
            "only_cross_attention": (False, False, False),
            "cross_attention_dim": 128,
            "norm_num_groups": 16,
        }
    )
    c.data.source = "shapes"
    c.data.image_size = 64
    c.data.num_train = 50_000
    c.data.data_dir = ""
    c.data.caption_dropout = 0.1  # trains the unconditional branch for CFG
    c.objective.prediction_type = "epsilon"
    c.objective.min_snr_gamma = 5.0
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 100
    c.optim.ema_decay = 0.999
    c.log_every = 50
    c.checkpoint_every = 500
    c.export_dtype = "float16"
    if arg.runlocal:
        c.steps, c.batch_size, c.log_every, c.checkpoint_every = 3, 8, 1, 3
        c.data.num_train = 64
        c.init_components = ml_collections.ConfigDict({})
    return c
