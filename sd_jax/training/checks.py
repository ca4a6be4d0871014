"""A training config checked before anything expensive: numbers, names, paths, the data folder and the workdir.

:func:`check_config` raises :class:`ConfigError` naming the key and value and what to do. It reads only file
listings and (for an image folder) decodes images until the first readable one; it loads no model.
:func:`scratch_model_configs` turns ``config.model`` into the architecture dataclasses of a from-scratch run,
refusing unknown keys and architectures the models cannot build (the trainer builds from the same function).
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re
import tempfile

from sd_jax.errors import SDJaxError, UnsupportedArchitectureError

TRAINERS = ("diffusion", "lora", "controlnet", "textual_inversion")
COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2")
SOURCES = ("synthetic", "shapes", "folder", "tfds", "dreambooth")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ConfigError(SDJaxError, ValueError):
    """A training config (or the paths it names) cannot be used as given."""


def _need(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _positive_int(cfg, key: str) -> None:
    value = cfg.get(key)
    _need(isinstance(value, int) and not isinstance(value, bool) and value >= 1,
          f"{key}={value!r}: must be a whole number >= 1")  # fmt: skip


def scratch_model_configs(cfg):
    """(UNetConfig, VAEConfig, CLIPTextConfig) of ``config.model``: the tiny defaults with its overrides."""
    from sd_jax.models import clip, unet, vae

    out = []
    for name, cls in (("unet", unet.UNetConfig), ("vae", vae.VAEConfig), ("text", clip.CLIPTextConfig)):
        overrides = dict(cfg.model.get(name) or {})
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - fields)
        _need(not unknown, f"model.{name}: unknown key(s) {unknown}; {cls.__name__} has {sorted(fields)}")
        d = {k: tuple(v) if isinstance(v, list) else v for k, v in overrides.items()}
        try:
            arch = dataclasses.replace(cls.tiny(), **d)
            cls.from_diffusers_config(arch.to_diffusers_config())  # the same checks as a loaded config.json
        except (UnsupportedArchitectureError, TypeError, ValueError) as e:
            raise ConfigError(f"model.{name} {overrides}: {e}") from e
        out.append(arch)
    return tuple(out)


def check_model_builds(cfg) -> None:
    """Trace (no compute) the from-scratch models' init, so a shape error is a config error, not a traceback."""
    import jax

    from sd_jax.models import clip, unet, vae

    for name, arch, mod in zip(("unet", "vae", "text"), scratch_model_configs(cfg), (unet, vae, clip)):
        try:
            jax.eval_shape(lambda k, a=arch, m=mod: m.init_params(a, k), jax.random.key(0))
        except Exception as e:  # flax/XLA raise many kinds for an inconsistent architecture
            raise ConfigError(f"model.{name}: this architecture does not build ({type(e).__name__}: {e})") from e


def _check_folder(path, key: str) -> None:
    from sd_jax.data.folder import ImageFolderError, check_readable

    _need(bool(path), f"{key} is empty: set it to a folder of images (--config.{key}=DIR)")
    _need(pathlib.Path(path).is_dir(), f"{key}={path!r}: no such folder")
    try:
        check_readable(path)
    except ImageFolderError as e:
        raise ConfigError(f"{key}={path!r}: {e}") from None


def _check_data(cfg) -> None:
    d = cfg.data
    _need(d.source in SOURCES, f"data.source={d.source!r}: must be one of {list(SOURCES)}")
    _positive_int(d, "image_size")
    dropout = d.get("caption_dropout", 0.0)
    _need(0.0 <= dropout <= 1.0, f"data.caption_dropout={dropout!r}: must be between 0 and 1")
    if d.source == "folder" and not d.get("cache"):
        _check_folder(d.get("path"), "data.path")
    elif d.source == "tfds":
        _need(bool(d.get("tfds_name")), "data.source='tfds' needs data.tfds_name (a prepared TFDS dataset)")
    elif d.source == "dreambooth":
        _check_folder(d.get("path"), "data.path")
        if d.get("with_prior_preservation"):
            _need(bool(d.get("class_path")), "DreamBooth prior preservation needs data.class_path: a folder for "
                  "the class images (created and filled if absent), e.g. --config.data.class_path=runs/class_images "
                  "(or --config.data.with_prior_preservation=False)")  # fmt: skip
            _need(not pathlib.Path(d.class_path).is_file(), f"data.class_path={d.class_path!r} is a file, not a folder")


def _check_init_from(cfg) -> None:
    src = cfg.get("init_from")
    if not src:
        trainer = cfg.get("trainer", "diffusion")
        _need(trainer == "diffusion", f"a {trainer} run needs init_from (the frozen base model)")
        return
    p = pathlib.Path(src)
    if p.exists() or (HUB_ID.match(str(src)) and not str(src).startswith((".", "/"))):
        return  # a local checkpoint, or a Hub id (the loader says when it is offline)
    raise ConfigError(f"init_from={src!r}: no such file or folder (a diffusers folder, a .safetensors file or a "
                      "Hub id org/name)")  # fmt: skip


def check_workdir(workdir, *, create: bool = True) -> pathlib.Path:
    """The workdir exists (created when ``create``) and takes files; refuses a file or a read-only folder."""
    _need(bool(workdir), "--workdir is required (checkpoints, metrics and exports go there)")
    w = pathlib.Path(workdir)
    _need(not w.exists() or w.is_dir(), f"--workdir {w}: exists and is not a folder")
    if not create:
        return w
    try:
        w.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=w, prefix=".write_test_"):
            pass
    except OSError as e:
        raise ConfigError(f"--workdir {w}: cannot write there ({e.strerror or e}); pick a writable folder") from None
    return w


def check_config(cfg, workdir=None, *, process_count: int = 1) -> None:
    """Everything that can be refused before models load: raises :class:`ConfigError`."""
    _need(cfg.get("trainer", "diffusion") in TRAINERS, f"trainer={cfg.get('trainer')!r}: one of {list(TRAINERS)}")
    for key in ("steps", "batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive_int(cfg, key)
    _need(cfg.batch_size % process_count == 0,
          f"batch_size={cfg.batch_size}: must divide evenly over {process_count} processes")  # fmt: skip
    _need(cfg.compute_dtype in ("float32", "bfloat16"), f"compute_dtype={cfg.compute_dtype!r}: float32 or bfloat16")
    train = tuple(cfg.train) if isinstance(cfg.train, (tuple, list)) else ()
    if cfg.get("trainer") == "controlnet":
        _need(train == ("controlnet",), f"train={cfg.train!r}: a ControlNet run trains '(\"controlnet\",)' only")
        from sd_jax.data.control import check as check_control

        _need(bool(check_control(cfg.data)), "a controlnet run needs data.control: column, canny or silhouette")
    else:
        _need(bool(train) and set(train) <= set(COMPONENTS),
              f"train={cfg.train!r}: a tuple of components from {list(COMPONENTS)}, e.g. '(\"unet\",)'")  # fmt: skip
    lr = cfg.optim.get("lr")
    _need(isinstance(lr, (int, float)) and math.isfinite(lr) and lr >= 0, f"optim.lr={lr!r}: a finite number >= 0")
    mem = cfg.get("max_memory_gb")
    _need(mem is None or (isinstance(mem, (int, float)) and mem >= 0),
          f"max_memory_gb={mem!r}: a number of GB (0: no memory check)")  # fmt: skip
    if cfg.get("sample_every"):
        _need(bool(cfg.get("sample_prompts")), "sample_every is set but sample_prompts is empty")
    _check_init_from(cfg)
    if not cfg.get("init_from"):
        check_model_builds(cfg)
    _check_data(cfg)
    if workdir is not None:
        check_workdir(workdir)
