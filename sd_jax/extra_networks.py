"""A1111's extra networks in prompts: ``<lora:NAME>``, ``<lora:NAME:WEIGHT>``, ``<lora:NAME:TE:UNET>`` (or
``te=`` / ``unet=``), parsed as A1111's Lora extension reads them.

The tags are cut out of the text the encoders see; the infotext keeps the prompt as written, as A1111's does.
A tag names a LoRA by its file's stem (or its path under the folder, without the suffix) in a LoRA folder
(``--lora-dir``). The text-encoder weight is the first number (default 1), the U-Net weight the second (default:
the text-encoder weight). As in A1111, the networks of a batch are those of its first prompt; the tags of the
other prompts are cut out only. ``<lyco:...>`` is read as ``<lora:...>``; other kinds (``<hypernet:...>``) are
refused, since sd-jax has no hypernetworks.

Applying them is :class:`sd_jax.pipelines.lora_sets.LoraSets`.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
import re

TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's extra-network pattern
KINDS = ("lora", "lyco")


class ExtraNetworkError(ValueError):
    """A tag that cannot be read or resolved; the message names it and says what to do."""


@dataclasses.dataclass(frozen=True)
class LoraTag:
    name: str
    te: float = 1.0
    unet: float = 1.0


def _weight(text: str, tag: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ExtraNetworkError(f"{tag}: weight {text!r} is not a number ; write e.g. <lora:NAME:0.8>") from None
    if not math.isfinite(value):
        raise ExtraNetworkError(f"{tag}: weight {text!r} is not a finite number")
    return value


def _lora(args: str, tag: str) -> LoraTag:
    positional, named = [], {}
    for item in args.split(":"):
        key, eq, value = item.partition("=")
        if eq:
            named[key.strip()] = value.strip()
        else:
            positional.append(item.strip())
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if unknown:
        raise ExtraNetworkError(f"{tag}: unknown argument {unknown[0]!r} ; use te=, unet=")
    if not positional or not positional[0]:
        raise ExtraNetworkError(f"{tag}: no LoRA name ; write <lora:NAME> or <lora:NAME:WEIGHT>")
    if "dyn" in named or len(positional) > 3:
        raise ExtraNetworkError(f"{tag}: dynamic LoRA rank (dyn) is not supported ; drop it")
    te = _weight(positional[1], tag) if len(positional) > 1 else 1.0
    te = _weight(named["te"], tag) if "te" in named else te
    unet = _weight(positional[2], tag) if len(positional) > 2 else te
    unet = _weight(named["unet"], tag) if "unet" in named else unet
    return LoraTag(positional[0], te, unet)


def parse(prompt: str) -> tuple[str, list[LoraTag]]:
    """``prompt`` without its tags, and the LoRAs they name, in order."""
    found: list[LoraTag] = []

    def cut(m: re.Match) -> str:
        kind, tag = m.group(1), m.group(0)
        if kind not in KINDS:
            raise ExtraNetworkError(f"{tag}: extra networks of kind {kind!r} are not supported (sd-jax has "
                                    "<lora:...> only) ; remove it from the prompt")  # fmt: skip
        found.append(_lora(m.group(2), tag))
        return ""

    return TAG.sub(cut, prompt), found


def parse_batch(prompts: list[str]) -> tuple[list[str], list[LoraTag]]:
    """Every prompt without its tags, and the networks of the batch: its first prompt's (as A1111)."""
    parsed = [parse(p) for p in prompts]
    return [text for text, _ in parsed], (parsed[0][1] if parsed else [])


def find_lora(name: str, folder: str | pathlib.Path | None) -> pathlib.Path:
    """The ``.safetensors`` file a tag names in ``folder``: by stem anywhere below it, or by its relative path."""
    if folder is None:
        raise ExtraNetworkError(f"<lora:{name}>: no LoRA folder to look in ; pass --lora-dir DIR")
    root = pathlib.Path(folder)
    direct = root / f"{name}.safetensors"
    if direct.is_file() and direct.resolve().is_relative_to(root.resolve()):
        return direct
    hits = sorted(p for p in root.rglob("*.safetensors") if p.stem == name)
    if len(hits) > 1:
        listed = ", ".join(str(p.relative_to(root).with_suffix("")) for p in hits)
        raise ExtraNetworkError(f"<lora:{name}>: several files have that name in {root} ({listed}) ; name one by "
                                "its path")  # fmt: skip
    if not hits:
        pickles = [p for ext in ("pt", "ckpt") for p in root.rglob(f"{name}.{ext}")]
        extra = f" ({pickles[0].name} is a pickle: convert it to .safetensors)" if pickles else ""
        raise ExtraNetworkError(f"<lora:{name}>: no {name}.safetensors in {root}{extra} ; see the names with "
                                "GET /sdapi/v1/loras or ls")  # fmt: skip
    return hits[0]


def available(folder: str | pathlib.Path | None) -> list[pathlib.Path]:
    """The LoRA files of ``folder``, by relative path."""
    if folder is None or not pathlib.Path(folder).is_dir():
        return []
    return sorted(pathlib.Path(folder).rglob("*.safetensors"))


def resolve(tags: list[LoraTag], folder) -> tuple[tuple[str, float, float], ...]:
    """``(path, te weight, unet weight)`` of each tag, in order: what :class:`LoraSets` takes."""
    return tuple((str(find_lora(t.name, folder)), t.te, t.unet) for t in tags)
