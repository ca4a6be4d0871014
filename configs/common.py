"""The defaults every training config starts from, and :func:`parse_arg` for the ``FILE:ARG`` variant string.

A config file starts from ``common.get_config()`` and sets only what it changes::

    def get_config(arg=None):
        arg = common.parse_arg(arg, runlocal=False)
        c = common.get_config()
        c.steps = 5000
        if arg.runlocal:
            c.steps = 3
        return c

``python train.py --config configs/NAME.py:runlocal`` passes ``"runlocal"`` as ``arg`` (see
``sd_jax/cli/train_config.py``). ``get_config()`` alone is a valid config: a 20-step synthetic-data run.

Keys the trainer reads only when a config sets them, and its fallback: ``trainer`` ("diffusion"; or "lora",
which also reads ``lora.*``; "textual_inversion", which reads ``textual_inversion.*``), ``init_components``
(none; e.g. ``{"vae": DIR}``: a component trained by an earlier run), ``max_memory_gb`` (None: the machine's
memory; 0: no check), ``export_dtype`` (None: float32; "float16"), ``sample_sampler`` ("euler"),
``optim.lr_min_ratio`` (0.0), ``data.num_train`` (50_000; "shapes" data) and ``objective.prior_loss_weight``
(1.0; DreamBooth).
"""

import ast

import ml_collections


def get_config():
    """Every key a config must carry, with its default value."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    c.init_from = None  # a diffusers folder, single file or Hub id to fine-tune from; None: from scratch
    c.train = ("unet",)  # components with gradients: ("unet",), ("unet", "text_encoder") or ("vae",)
    c.steps = 20
    c.batch_size = 8
    c.compute_dtype = "float32"  # "bfloat16": bf16 compute, fp32 master weights
    c.remat_policy = None  # e.g. "nothing_saveable" to rematerialize U-Net blocks
    c.attention = "auto"  # attention kernel: auto (CPU blocked, GPU cudnn, TPU flash), xla, blocked, cudnn, flash
    c.conv = "auto"  # U-Net convolution algorithm: auto (CPU: per shape, "cpu"; else xla), xla, im2col, shifted
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
    c.sharding = "dp"  # "dp", "fsdp" or "fsdp_tp" logical-axis rule presets

    # The from-scratch architecture (read only without init_from): overrides of UNetConfig.tiny(),
    # VAEConfig.tiny() and CLIPTextConfig.tiny(). An 8x8 latent is a 32 px image through the tiny VAE.
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
    c.objective.prediction_type = "epsilon"  # or "v_prediction"; "": from the checkpoint's scheduler config
    c.objective.min_snr_gamma = 5.0  # None to turn off
    c.objective.offset_noise = 0.0
    c.objective.zero_snr = False
    c.objective.vae_loss = "l1"
    c.objective.kl_weight = 1e-6

    c.optim = ml_collections.ConfigDict()
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 5
    c.optim.lr_schedule = "cosine"
    c.optim.steps = c.get_ref("steps")  # follows c.steps, also when a config or --config.steps sets it
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


def _parse_bool(name: str, raw: str) -> bool:
    low = raw.lower()
    if low in ("true", "1", "yes"):
        return True
    if low in ("false", "0", "no"):
        return False
    raise ValueError(f"config arg {name}={raw!r}: expected true or false")


def _parse(name: str, raw: str, default):
    if isinstance(default, bool):
        return _parse_bool(name, raw)
    if default is None:  # untyped: a Python literal if it is one, else the string
        try:
            return ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            return raw
    try:
        return type(default)(raw)
    except ValueError:
        raise ValueError(f"config arg {name}={raw!r}: expected {type(default).__name__}") from None


def parse_arg(arg, **defaults) -> ml_collections.ConfigDict:
    """``"variant=sd21,runlocal"`` -> ``ConfigDict(variant="sd21", runlocal=True)``, as big_vision's ``parse_arg``.

    Each keyword names an argument and its default; a value given in ``arg`` is parsed as the default's type
    (bool: true/false/1/0/yes/no; int; float; str; a ``None`` default takes a Python literal or the string).
    A bare name is a True flag. Unlike big_vision, a bare value never fills the first argument: every name
    must be one of ``defaults``, or :class:`ValueError` names it and the known ones.
    """
    out = dict(defaults)
    known = ", ".join(defaults) or "none: this config takes no argument"
    for item in (arg or "").split(","):
        item = item.strip()
        if not item:
            continue
        name, eq, raw = item.partition("=")
        name = name.strip()
        if name not in defaults:
            raise ValueError(f"config arg {arg!r}: unknown variant {name!r} (known: {known})")
        if not eq:
            if not isinstance(defaults[name], bool):
                raise ValueError(f"config arg {arg!r}: {name} needs a value ({name}=VALUE)")
            out[name] = True
        else:
            out[name] = _parse(name, raw.strip(), defaults[name])
    return ml_collections.ConfigDict(out, type_safe=False)
