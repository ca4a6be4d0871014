"""The LoRAs a prompt names (:mod:`sd_jax.extra_networks`), merged on a pipeline's weights for one batch.

:class:`LoraSets` remembers the weights as they were before any set (with the LoRAs merged by ``--lora`` or
``pipe.load_lora``), and builds each set from those, so sets never accumulate rounding: switching back to an
earlier set gives the same weights bit for bit. Only the adapted kernels are new arrays, and the shapes do not
change, so nothing recompiles. Loaded files are kept (a few) for the next batch that names them.
"""

from __future__ import annotations

import collections

from sd_jax.models.lora import Lora, merge_lora

Entry = tuple[str, float, float]  # (path, text-encoder weight, U-Net weight)


def _part(lora: Lora, components) -> Lora:
    keep = {c: t for c, t in lora.params.items() if c in components}
    return Lora(keep, {k: a for k, a in lora.alphas.items() if k[0] in components})


class LoraSets:
    """``use(entries)`` puts ``entries`` (and only them) on ``pipe``'s weights; ``use(())`` restores them."""

    def __init__(self, pipe, cache_size: int = 8):
        self.pipe = pipe
        self.base = dict(pipe.params)
        self.current: tuple[Entry, ...] = ()
        self.files: collections.OrderedDict = collections.OrderedDict()
        self.cache_size = cache_size

    def _load(self, path: str) -> Lora:
        from sd_jax.loading.lora import load_lora

        if path in self.files:
            self.files.move_to_end(path)
            return self.files[path]
        names = ("unet", *self.pipe.components.text_names)
        lora = load_lora(path, {n: self.base[n] for n in names}, unet_config=self.pipe.unet.config)
        self.files[path] = lora
        while len(self.files) > self.cache_size:
            self.files.popitem(last=False)
        return lora

    def use(self, entries) -> None:
        entries = tuple((str(p), float(te), float(unet)) for p, te, unet in entries)
        if entries == self.current:
            return
        loras = [(self._load(p), te, unet) for p, te, unet in entries]  # every file read before any change
        text = self.pipe.components.text_names
        params = {n: self.base[n] for n in ("unet", *text)}
        for lora, te, unet in loras:
            params = merge_lora(params, _part(lora, ("unet",)), unet)
            params = merge_lora(params, _part(lora, text), te)
        self.pipe.params = {**self.pipe.params, **params}
        self.current = entries
