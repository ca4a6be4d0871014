"""A1111's "infotext": the generation parameters a PNG carries in its ``parameters`` text (JPEG/WebP: EXIF
UserComment), as AUTOMATIC1111's ``processing.create_infotext`` writes them and its
``infotext_utils.parse_generation_parameters`` reads them::

    a cat, highly detailed
    Negative prompt: blurry
    Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 512x512, ...

The prompt (any number of lines); a ``Negative prompt:`` line (left out when empty), whose text runs to the last
line; then one line of ``Key: value`` pairs joined by ``", "``. A value holding ``,``, ``:`` or a newline is
written as a JSON string (A1111's ``quote``); a pair whose value equals its key is written as the bare key.
Readers (A1111, civitai, image browsers) ignore keys they do not know, so sd-jax's own reproduction keys
(``Batch size``, ``Batch pos``, ``Mode``, ...) sit beside the standard ones.

Also here: the tables between sd-jax's sampler and schedule-type names and A1111's (both directions).
"""

from __future__ import annotations

import json
import re

# sd-jax sampler -> (A1111 sampler name, schedule type the name implies or None)
SAMPLER_TO_A1111: dict[str, str] = {
    "euler_a": "Euler a", "euler": "Euler", "lms": "LMS", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M", "dpmpp_2m_sde": "DPM++ 2M SDE", "unipc": "UniPC", "ddim": "DDIM",
    "pndm": "PLMS", "lcm": "LCM", "ddpm": "DDPM",
}  # fmt: skip
# A1111's k-diffusion aliases and its pre-1.9 names, which folded the schedule type into the sampler name
_A1111_ALIASES: dict[str, tuple[str, str | None]] = {
    "k_euler_a": ("euler_a", None), "k_euler_ancestral": ("euler_a", None), "k_euler": ("euler", None),
    "k_lms": ("lms", None), "k_heun": ("heun", None), "k_dpmpp_2m": ("dpmpp_2m", None),
    "dpm++ 2m karras": ("dpmpp_2m", "karras"), "dpm++ 2m sde karras": ("dpmpp_2m_sde", "karras"),
    "lms karras": ("lms", "karras"), "dpm++ 2m sde exponential": ("dpmpp_2m_sde", "exponential"),
    "k_dpmpp_2m_ka": ("dpmpp_2m", "karras"), "k_lms_ka": ("lms", "karras"),
}  # fmt: skip
# A1111 samplers sd-jax does not implement (named in the error, so the user can pick another)
A1111_ONLY_SAMPLERS = ("DPM2", "DPM2 a", "DPM++ 2S a", "DPM++ SDE", "DPM++ 2M SDE Heun", "DPM++ 3M SDE",
                       "DPM fast", "DPM adaptive", "Restart", "DDIM CFG++", "Euler a Karras")  # fmt: skip

SCHEDULE_TO_A1111: dict[str, str] = {
    "default": "Automatic", "karras": "Karras", "exponential": "Exponential", "beta": "Beta",
    "sgm_uniform": "SGM Uniform", "simple": "Simple",
}  # fmt: skip
_SCHEDULE_ALIASES = {"sgmuniform": "sgm_uniform"}  # A1111's alias
A1111_ONLY_SCHEDULES = ("Uniform", "Polyexponential", "KL Optimal", "Align Your Steps", "Normal", "DDIM",
                        "Karras Exponential")  # fmt: skip

# The order A1111's create_infotext writes its keys in; other keys follow them, Version and User come last.
FIELD_ORDER = ("Steps", "Sampler", "Schedule type", "CFG scale", "Image CFG scale", "Seed", "Face restoration",
               "Size", "Model hash", "Model", "VAE hash", "VAE", "Variation seed", "Variation seed strength",
               "Seed resize from", "Denoising strength", "Conditional mask weight", "Clip skip", "ENSD",
               "Init image hash", "RNG", "Tiling", "Hires upscale", "Hires steps", "Hires upscaler",
               "Lora hashes", "TI hashes")  # fmt: skip
LAST_FIELDS = ("Version", "User")

# A1111's re_param: a key (a word, then words, spaces, - and /), a colon, a JSON string or text up to a comma
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


class InfotextError(ValueError):
    """A value in an infotext that sd-jax cannot use; the message names the key and the value."""


def sampler_to_a1111(name: str) -> str:
    if name not in SAMPLER_TO_A1111:
        raise InfotextError(f"sampler {name!r} has no A1111 name ; known: {', '.join(sorted(SAMPLER_TO_A1111))}")
    return SAMPLER_TO_A1111[name]


def schedule_to_a1111(schedule: str, sampler: str | None = None) -> str:
    """A1111's Schedule type; the ``dpmpp_2m_karras`` alias is DPM++ 2M with Karras."""
    if sampler == "dpmpp_2m_karras" and schedule == "default":
        schedule = "karras"
    return SCHEDULE_TO_A1111[schedule]


def sampler_from_a1111(name: str) -> tuple[str, str | None]:
    """(sd-jax sampler, schedule type the name implies or None) for an A1111 sampler name or alias."""
    for ours, theirs in SAMPLER_TO_A1111.items():
        if name == theirs and ours != "dpmpp_2m_karras":
            return ours, None
    key = name.strip().lower()
    for ours, theirs in SAMPLER_TO_A1111.items():
        if key in (theirs.lower(), ours) and ours != "dpmpp_2m_karras":
            return ours, None
    if key in _A1111_ALIASES:
        return _A1111_ALIASES[key]
    known = ", ".join(v for k, v in SAMPLER_TO_A1111.items() if k != "dpmpp_2m_karras")
    why = "an A1111 sampler sd-jax does not have" if name in A1111_ONLY_SAMPLERS else "not a sampler sd-jax knows"
    raise InfotextError(f"Sampler: {name!r} is {why} ; choose one of {known} (or pass --sampler)")


def schedule_from_a1111(name: str) -> str:
    key = name.strip().lower()
    for ours, theirs in SCHEDULE_TO_A1111.items():
        if key in (theirs.lower(), ours):
            return ours
    if key in _SCHEDULE_ALIASES:
        return _SCHEDULE_ALIASES[key]
    why = "an A1111 schedule type sd-jax does not have" if name in A1111_ONLY_SCHEDULES else "not a schedule type"
    raise InfotextError(f"Schedule type: {name!r} is {why} ; choose one of {', '.join(SCHEDULE_TO_A1111.values())}")


def quote(value) -> str:
    """A1111's quoting: text with ``,``, ``:`` or a newline becomes a JSON string (non-ASCII kept)."""
    text = format_value(value)
    if "," not in text and ":" not in text and "\n" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def format_value(value) -> str:
    """Numbers as A1111 shows them: whole floats without ``.0`` (``CFG scale: 7``), others exactly (repr)."""
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() and abs(value) < 2**53 else repr(value)
    return str(value)


def _order(key: str) -> tuple[int, int]:
    if key in LAST_FIELDS:
        return 2, LAST_FIELDS.index(key)
    if key in FIELD_ORDER:
        return 0, FIELD_ORDER.index(key)
    return 1, 0  # sorted() is stable: other keys keep the caller's order


def format_infotext(prompt: str, negative: str | None, params: dict) -> str:
    """The infotext of one image. ``params``: A1111 keys to values; None values are left out; keys are put in
    A1111's order (:data:`FIELD_ORDER`, then the rest in the given order, then ``Version``)."""
    items = sorted(((k, v) for k, v in params.items() if v is not None), key=lambda kv: _order(kv[0]))
    for k, _ in items:
        if not re.fullmatch(r"\w[\w \-/]+", k):
            raise InfotextError(f"infotext key {k!r} is not a word followed by words, spaces, - or /")
    line = ", ".join(k if k == format_value(v) else f"{k}: {quote(v)}" for k, v in items)
    neg = f"\nNegative prompt: {negative}" if negative else ""
    return f"{prompt}{neg}\n{line}".strip()


def parse_infotext(text: str) -> dict[str, str]:
    """The fields of an infotext as A1111 reads them: ``Prompt``, ``Negative prompt`` (both always present, maybe
    empty) and each ``Key: value`` of the last line (unquoted, as strings). The last line counts as parameters
    only if it holds at least 3 pairs (A1111's rule); ``Size: WxH`` is kept whole (see :func:`size`)."""
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:") :].strip()
        (negative if in_negative else prompt).append(line)
    out = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for k, v in _PARAM.findall(last):
        out[k] = unquote(v) if v[:1] == '"' and v[-1:] == '"' else v
    return out


def size(fields: dict) -> tuple[int, int] | None:
    """(width, height) of ``Size: WxH``, or None."""
    m = re.fullmatch(r"(\d+)x(\d+)", fields.get("Size", "").strip())
    return (int(m.group(1)), int(m.group(2))) if m else None


def parse_hashes(value: str) -> dict[str, str]:
    """``Lora hashes`` / ``TI hashes``: ``"name: hash, name: hash"`` -> {name: hash}."""
    out = {}
    for part in value.split(","):
        name, sep, h = part.partition(":")
        if sep and name.strip():
            out[name.strip()] = h.strip()
    return out


def format_hashes(pairs) -> str | None:
    """The other way: ``(name, hash)`` pairs, names cleaned of ``:`` and ``,`` as A1111 cleans them."""
    items = [f"{n.replace(':', '').replace(',', '')}: {h}" for n, h in pairs if h]
    return ", ".join(items) or None
