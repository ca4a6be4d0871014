"""What a client may list and pick: checkpoints (the start-up model and what lies directly under
``--models-dir``), samplers, schedule types, LoRAs and embeddings, in A1111's response shapes.

A client names a checkpoint by the title or name this listing gives; nothing resolves a path the request
spells, so ``../`` or an absolute path never reaches the file system: it is simply not a listed name.
"""

from __future__ import annotations

import dataclasses
import pathlib

from sd_jax import extra_networks, hashing
from sd_jax import infotext as it
from sd_jax.serve.fields import FieldError

WEIGHT_FILES = (".safetensors",)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    path: str
    name: str
    hash: str | None

    @property
    def title(self) -> str:
        return f"{self.name} [{self.hash}]" if self.hash else self.name

    def entry(self) -> dict:
        return {"title": self.title, "model_name": self.name, "hash": self.hash, "sha256": None,
                "filename": self.path, "config": None}  # fmt: skip


def checkpoint(path) -> Checkpoint:
    return Checkpoint(str(path), hashing.model_name(path), hashing.model_hash(path))


def scan(start_model: str, models_dir: str | None) -> list[Checkpoint]:
    """The start-up model, then each diffusers folder (``model_index.json``) and ``.safetensors`` file directly
    under ``models_dir``, by name."""
    found = [checkpoint(start_model)]
    if models_dir:
        root = pathlib.Path(models_dir)
        for p in sorted(root.iterdir()):
            if (p.is_dir() and (p / "model_index.json").is_file()) or (p.is_file() and p.suffix in WEIGHT_FILES):
                if str(p.resolve()) != str(pathlib.Path(start_model).resolve()):
                    found.append(checkpoint(p))
    return found


def pick(checkpoints: list[Checkpoint], wanted, field: str = "sd_model_checkpoint") -> Checkpoint:
    """The listed checkpoint a client names (title, name, or name with its extension); else a FieldError."""
    if isinstance(wanted, str):
        for c in checkpoints:
            if wanted in (c.title, c.name, pathlib.Path(c.path).name):
                return c
    names = ", ".join(c.title for c in checkpoints)
    raise FieldError(field, f"{field}={wanted!r} is not a model this server lists ; choose one of {names} "
                            "(GET /sdapi/v1/sd-models)")  # fmt: skip


def samplers() -> list[dict]:
    aliases: dict[str, list[str]] = {}
    for alias, (ours, _) in it._A1111_ALIASES.items():
        aliases.setdefault(it.SAMPLER_TO_A1111[ours], []).append(alias)
    return [{"name": name, "aliases": [ours, *aliases.get(name, [])], "options": {}}
            for ours, name in it.SAMPLER_TO_A1111.items() if ours != "dpmpp_2m_karras"]  # fmt: skip


def schedulers() -> list[dict]:
    return [{"name": "automatic" if ours == "default" else ours, "label": label, "aliases": None, "default_rho": -1,
             "need_inner_model": False} for ours, label in it.SCHEDULE_TO_A1111.items()]  # fmt: skip


def loras(merged: list[tuple[str, float]], folder=None) -> list[dict]:
    """The LoRAs merged at start-up (``--lora``), then those prompts may name as ``<lora:NAME>`` (``--lora-dir``)."""
    out = [{"name": pathlib.Path(p).stem, "alias": pathlib.Path(p).stem, "path": pathlib.Path(p).name,
            "metadata": {"merged_scale": s}} for p, s in merged]  # fmt: skip
    for p in extra_networks.available(folder):
        rel = p.relative_to(folder)
        out.append({"name": p.stem, "alias": p.stem, "path": str(rel), "metadata": {}})
    return out


def embeddings(loaded: dict[str, list[str]]) -> dict:
    """``loaded``: each embedding's name -> the tokens it added (one per vector)."""
    return {"loaded": {name: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None, "shape": None,
                              "vectors": len(tokens)} for name, tokens in loaded.items()}, "skipped": {}}  # fmt: skip
