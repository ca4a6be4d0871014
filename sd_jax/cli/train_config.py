"""Config files and ``--config.KEY=VALUE`` overrides for ``train.py`` and the cache CLI, with one-line errors.

A config file is a Python module whose ``get_config(arg=None)`` returns an ``ml_collections.ConfigDict``;
``--config FILE:ARG`` passes ``ARG``. An override names an existing key (``--config.optim.lr=1e-4``) and its value
is parsed by the type already there: bool (true/false/1/0), int, float, str, tuple (a Python literal such as
``'("unet","text_encoder")'`` or ``a,b``), ``None`` for any non-string key. Under ``model.unet``, ``model.vae`` and
``model.text`` any field of the architecture dataclass may be set. An unknown key names its closest matches.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import pathlib
import sys

from ml_collections import ConfigDict


class UsageError(ValueError):
    """A command line that cannot be run as given (exit status 2)."""


ARCH_GROUPS = {"model.unet": "UNetConfig", "model.vae": "VAEConfig", "model.text": "CLIPTextConfig"}


def load_config(spec: str) -> ConfigDict:
    """``FILE`` or ``FILE:ARG`` -> the file's ``get_config([ARG])``."""
    path, _, arg = spec.partition(":")
    p = pathlib.Path(path)
    if not p.is_file():
        near = sorted(x.name for x in p.parent.glob("*.py")) if p.parent.is_dir() else []
        hint = f"; {p.parent} has {', '.join(near)}" if near else ""
        raise UsageError(f"--config {spec}: no such file{hint}")
    root = str(p.resolve().parent.parent)  # configs import each other as ``configs.NAME``
    if root not in sys.path:
        sys.path.insert(0, root)
    try:
        mod_spec = importlib.util.spec_from_file_location(f"_sd_jax_config_{p.stem}", p)
        module = importlib.util.module_from_spec(mod_spec)
        mod_spec.loader.exec_module(module)
        get = module.get_config
        cfg = get(arg) if arg else get()
    except Exception as e:  # a user's Python file: anything can go wrong in it
        raise UsageError(f"--config {spec}: could not load it ({type(e).__name__}: {e})") from e
    if not isinstance(cfg, ConfigDict):
        raise UsageError(f"--config {spec}: get_config() returned {type(cfg).__name__}, not a ConfigDict")
    return cfg


def flat_keys(cfg: ConfigDict, prefix: str = "") -> dict:
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, ConfigDict):
            out.update(flat_keys(v, key + "."))
        else:
            out[key] = v
    return out


def _arch_fields(group: str) -> dict:
    from sd_jax.models import clip, unet, vae

    cls = {"model.unet": unet.UNetConfig, "model.vae": vae.VAEConfig, "model.text": clip.CLIPTextConfig}[group]
    base = cls.tiny()
    return {f.name: getattr(base, f.name) for f in dataclasses.fields(cls)}


def parse_value(raw: str, current, key: str):
    """``raw`` (a command-line string) as the type of ``current``."""

    def bad(kind):
        return UsageError(f"--config.{key}={raw!r}: expected {kind} (the key holds {current!r})")

    if raw in ("None", "none") and not isinstance(current, str):
        return None
    if isinstance(current, bool):
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise bad("true or false")
    if isinstance(current, int):
        try:
            return int(raw)
        except ValueError:
            raise bad("a whole number") from None
    if isinstance(current, float):
        try:
            return float(raw)
        except ValueError:
            raise bad("a number") from None
    if isinstance(current, str):
        return raw
    if isinstance(current, ConfigDict):
        raise UsageError(f"--config.{key}: is a group of keys; set one of them, e.g. --config.{key}.NAME=VALUE")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    if isinstance(current, (tuple, list)):
        if isinstance(value, str):
            value = tuple(x.strip() for x in value.split(",") if x.strip())
        return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return value  # a None key: a literal if it is one, else the string


def apply_overrides(cfg: ConfigDict, overrides: list[tuple[str, str | None]]) -> ConfigDict:
    """Set each ``(dotted key, raw value)``; a bare boolean flag (value None) means True."""
    keys = flat_keys(cfg)
    for key, raw in overrides:
        group, _, leaf = key.rpartition(".")
        arch = _arch_fields(group) if group in ARCH_GROUPS else None
        if key in keys:
            current = keys[key]
        elif arch is not None and leaf in arch:
            current = arch[leaf]
        elif isinstance(_get(cfg, key), ConfigDict):
            current = _get(cfg, key)
        else:
            pool = list(keys) + ([f"{group}.{f}" for f in arch] if arch else [])
            near = difflib.get_close_matches(key, pool, n=3, cutoff=0.6)
            hint = f" (did you mean {', '.join(near)}?)" if near else ""
            raise UsageError(f"--config.{key}: unknown config key{hint}; --show-config lists them all")
        if raw is None:
            if not isinstance(current, bool):
                raise UsageError(f"--config.{key}: needs a value (--config.{key}=VALUE)")
            value = True
        else:
            value = parse_value(raw, current, key)
        node = _get(cfg, group) if group else cfg
        try:
            with node.unlocked():  # model.unet & co. take new keys; the rest were checked above
                node[leaf] = value
        except (TypeError, ValueError) as e:
            raise UsageError(f"--config.{key}={raw!r}: {e}") from None
        keys = flat_keys(cfg)
    return cfg


def _get(cfg, key: str):
    node = cfg
    for part in key.split(".") if key else []:
        if not isinstance(node, ConfigDict) or part not in node:
            return None
        node = node[part]
    return node


def split_overrides(argv: list[str]) -> tuple[list[tuple[str, str | None]], list[str]]:
    """``--config.KEY=VALUE`` / ``--config.KEY VALUE`` / ``--config.KEY`` out of ``argv``; the rest is returned."""
    overrides, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--config."):
            key, eq, value = a[len("--config.") :].partition("=")
            if not eq and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                value, i = argv[i + 1], i + 1
            overrides.append((key, value if (eq or value) else None))
        else:
            rest.append(a)
        i += 1
    return overrides, rest


def describe(cfg: ConfigDict) -> str:
    """Every key with its value, one a line (what ``--show-config`` prints)."""
    return "\n".join(f"{k} = {v!r}" for k, v in flat_keys(cfg).items())
