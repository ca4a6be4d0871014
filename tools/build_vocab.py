"""Build CLIP's ``vocab.json`` and ``merges.txt`` from OpenAI's BPE file.

The BPE file ``bpe_simple_vocab_16e6.txt.gz`` (MIT) ships inside the PyPI wheel
``open_clip_torch``; get it without torch via::

    pip download --no-deps open_clip_torch -d /tmp/oc
    python tools/build_vocab.py --wheel /tmp/oc/open_clip_torch-*.whl --out sd_jax/tokenizer_files

The vocabulary is laid out as CLIP's tokenizer does: the 256 byte symbols, the
same with the end-of-word marker ``</w>``, one entry per merge, then
``<|startoftext|>`` and ``<|endoftext|>`` (49408 entries in all).
``--max-merges N`` builds a smaller but valid tokenizer (used by the test fixtures).
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import pathlib
import zipfile

BPE_MEMBER = "open_clip/bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2  # as in CLIP's SimpleTokenizer


def byte_symbols() -> list[str]:
    """GPT-2's reversible byte -> printable unicode table, in CLIP's order.

    Printable bytes map to themselves and come first; the other bytes follow,
    mapped to code points from 256 up.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    rest = [b for b in range(256) if b not in printable]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(rest))]


def read_merges(wheel: str) -> list[tuple[str, str]]:
    with zipfile.ZipFile(wheel) as z:
        text = gzip.decompress(z.read(BPE_MEMBER)).decode("utf-8")
    lines = text.split("\n")[1 : NUM_MERGES + 1]  # line 0 is a version header
    return [tuple(line.split()) for line in lines]


def build(merges: list[tuple[str, str]]) -> tuple[dict[str, int], list[str]]:
    symbols = byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return {t: i for i, t in enumerate(tokens)}, [" ".join(m) for m in merges]


def write(out: pathlib.Path, vocab: dict[str, int], merges: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, separators=(",", ":")), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--wheel", default=None, help="open_clip_torch wheel (default: newest in /tmp/oc)")
    p.add_argument("--out", default="sd_jax/tokenizer_files")
    p.add_argument("--max-merges", type=int, default=None)
    args = p.parse_args()
    wheel = args.wheel or sorted(glob.glob("/tmp/oc/open_clip_torch-*.whl"))[-1]
    merges = read_merges(wheel)[: args.max_merges]
    vocab, merge_lines = build(merges)
    write(pathlib.Path(args.out), vocab, merge_lines)
    print(f"wrote {len(vocab)} tokens and {len(merge_lines)} merges to {args.out}")


if __name__ == "__main__":
    main()
