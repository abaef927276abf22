"""The 1000 ImageNet-1k (ILSVRC-2012) classes, in the index order every ImageNet classifier uses:
the WordNet synset ids sorted (n01440764 ... n15075141), each with its WordNet lemmas.

``imagenet_classes.txt`` beside this file holds one ``synset<TAB>lemma, lemma, ...`` line per
class; the display label is the first lemma ("tench" for "tench, Tinca tinca"). Two labels occur
twice ("crane": the bird 134 and the machine 517; "maillot": 638 and 639), so code keys classes
by index, never by label. The dog breeds are 151-268 (Chihuahua ... Mexican hairless).
"""
from __future__ import annotations

import functools
from importlib import resources

DOG_BREEDS = range(151, 269)


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[tuple[str, str], ...]:
    """(synset id, lemmas) of the 1000 classes, in index order."""
    text = resources.files(__package__).joinpath("imagenet_classes.txt").read_text(encoding="utf-8")
    rows = tuple(tuple(line.split("\t", 1)) for line in text.splitlines() if line.strip())
    if len(rows) != 1000 or any(len(r) != 2 for r in rows):
        raise ValueError(f"imagenet_classes.txt: expected 1000 'synset<TAB>lemmas' lines, got {len(rows)}")
    return rows


def imagenet_labels(full: bool = False) -> list[str]:
    """The label of each class: its first lemma, or with ``full`` every lemma ("tench, Tinca tinca")."""
    return [lemmas if full else lemmas.split(", ")[0] for _, lemmas in imagenet_classes()]
