"""sample.py's ``<lora:NAME:WEIGHT>`` prompt tags (:mod:`sd_jax.extra_networks`), found in ``--lora-dir``.

Every tag of every prompt is read and its file found before the model loads. Each batch (``--batch-size``
prompts) merges the LoRAs of its first prompt, as A1111 does, on top of the ``--lora`` ones; the text encoders
see the prompts without their tags, and the infotext keeps them and adds the files' ``Lora hashes``.
"""

from __future__ import annotations

import pathlib

from sd_jax import extra_networks, hashing
from sd_jax import infotext as it
from sd_jax.cli.sample_args import UsageError


def add_flags(parser) -> None:
    parser.add_argument("--lora-dir", metavar="DIR", help="folder of the LoRAs prompts name as <lora:NAME:WEIGHT> "
                                                          "(A1111's models/Lora)")  # fmt: skip


class PromptLoras:
    def __init__(self, args, prompts: list[str]):
        if args.lora_dir is not None and not pathlib.Path(args.lora_dir).is_dir():
            raise UsageError(f"--lora-dir {args.lora_dir}: no such folder")
        self.parsed = {}
        for p in dict.fromkeys(prompts):
            try:
                text, tags = extra_networks.parse(p)
                entries = extra_networks.resolve(tags, args.lora_dir)
            except extra_networks.ExtraNetworkError as e:
                raise UsageError(str(e)) from None
            self.parsed[p] = (text, tags, entries)
        self.sets = None

    def text(self, prompts: list[str]) -> list[str]:
        """The prompts as the text encoders see them."""
        return [self.parsed[p][0] for p in prompts]

    def use(self, pipe, prompts: list[str], shared: dict) -> dict:
        """Merge the batch's LoRAs (its first prompt's) on ``pipe``; ``shared`` with their ``Lora hashes``."""
        from sd_jax.pipelines.lora_sets import LoraSets

        _, tags, entries = self.parsed[prompts[0]]
        if entries and self.sets is None:
            self.sets = LoraSets(pipe)
        if self.sets is not None:
            self.sets.use(entries)
        if not entries:
            return shared
        ours = it.format_hashes((t.name, hashing.lora_hash(p)) for t, (p, _, _) in zip(tags, entries))
        return {**shared, "Lora hashes": ", ".join(h for h in (shared.get("Lora hashes"), ours) if h)}
