"""Text for training SAEs: the built-in corpus, user text files, and chat-formatted prompts.

No hub downloads work here, so the built-in corpus comes from a PyPI wheel: ``gensim`` ships a
shortened English Wikipedia dump and the Lee news corpus as test data. The wheel is fetched
once into the cache folder (:func:`guard.wheels.cached_wheel`) and read as a zip archive;
gensim itself is never installed.

An SAE for a chat model should see what the model reads in service, so a share of the
documents is wrapped as chat turns with the tokenizer's own chat template (questions and
instructions built from the document's title and sentences, the document as the answer).

Training and held-out text are split by document, so no held-out row shares a document with a
training row. Reads text only: no torch here.
"""

from __future__ import annotations

import bz2
import dataclasses
import html
import json
import random
import re
import xml.etree.ElementTree as ET
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

from guard.errors import InvalidInput
from guard.wheels import WheelUnavailable, cached_wheel

GENSIM_REQUIREMENT = "gensim==4.4.0"
WIKI_MEMBER_PATTERN = re.compile(
    r"gensim/test/test_data/enwiki-latest-pages-articles.*-shortened\.bz2$"
)
LEE_MEMBER = "gensim/test/test_data/lee_background.cor"

#: Sections after which a Wikipedia article is lists of links, not prose.
_TRAILING_SECTIONS = (
    "see also",
    "references",
    "notes",
    "external links",
    "further reading",
    "bibliography",
    "sources",
    "footnotes",
    "citations",
)
_LINK_PREFIXES = ("file:", "image:", "category:", "media:", "wikipedia:", "wp:", "template:")
_MIN_PARAGRAPH_WORDS = 6


@dataclasses.dataclass(frozen=True)
class Document:
    """One document of the corpus: the unit of the train/held-out split."""

    source: str
    """Where it comes from: ``wikipedia``, ``lee``, or a user file's name."""
    title: str
    """The article title, or the first words of the text where there is none."""
    text: str
    """Plain text; paragraphs separated by blank lines."""


class ChatTokenizer(Protocol):
    """What the corpus needs from a Hugging Face tokenizer."""

    def apply_chat_template(
        self, conversation: list[dict[str, str]], *, tokenize: bool, add_generation_prompt: bool
    ) -> Any: ...


# ---------------------------------------------------------------------------------------------
# Sources


def builtin_documents(cache: Path) -> list[Document]:
    """The shortened English Wikipedia (articles) and the Lee news corpus (one story a line)."""
    wheel = cached_wheel(cache, GENSIM_REQUIREMENT, instead="pass --corpus FILE")
    try:
        with zipfile.ZipFile(wheel) as archive:
            names = archive.namelist()
            wiki = [n for n in names if WIKI_MEMBER_PATTERN.search(n)]
            if not wiki or LEE_MEMBER not in names:
                raise WheelUnavailable(
                    f"{wheel}: expected {WIKI_MEMBER_PATTERN.pattern} and {LEE_MEMBER} in the "
                    "wheel; a different gensim release may have moved its test data"
                )
            with archive.open(wiki[0]) as raw, bz2.open(raw) as xml_stream:
                documents = list(wikipedia_documents(xml_stream))
            lee = archive.read(LEE_MEMBER).decode("utf-8", errors="replace")
    except zipfile.BadZipFile as e:
        raise WheelUnavailable(f"{wheel}: not a wheel (zip) file: {e}; delete it") from e
    stories = [line.strip() for line in lee.splitlines() if line.strip()]
    documents.extend(Document("lee", _first_words(story), story) for story in stories)
    return documents


def wikipedia_documents(xml_stream: Any) -> Iterator[Document]:
    """Articles (namespace 0, no redirects) of a MediaWiki XML dump, markup stripped."""
    title = ""
    namespace = ""
    for _event, element in ET.iterparse(xml_stream, events=("end",)):
        tag = element.tag.rsplit("}", 1)[-1]
        if tag == "title":
            title = element.text or ""
        elif tag == "ns":
            namespace = element.text or ""
        elif tag == "text":
            raw = element.text or ""
            if namespace == "0" and not raw.lstrip().lower().startswith("#redirect"):
                text = strip_wiki_markup(raw)
                if text:
                    yield Document("wikipedia", title, text)
        elif tag == "page":
            element.clear()


def text_file_documents(path: Path) -> list[Document]:
    """A user corpus: ``.jsonl`` with a ``text`` field per line (and an optional ``title``),
    or plain text where a blank line separates documents."""
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InvalidInput(f"{path}: cannot read the corpus file: {e}") from e
    documents: list[Document] = []
    if path.suffix == ".jsonl":
        for number, line in enumerate(content.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path}:{number}: expected a JSON object: {e}") from e
            if not isinstance(item, dict) or not isinstance(item.get("text"), str):
                raise InvalidInput(f"{path}:{number}: expected an object with a 'text' string")
            title = item.get("title")
            text = item["text"].strip()
            if text:
                documents.append(
                    Document(
                        path.name, title if isinstance(title, str) else _first_words(text), text
                    )
                )
    else:
        for block in re.split(r"\n\s*\n", content):
            text = " ".join(block.split())
            if text:
                documents.append(Document(path.name, _first_words(text), text))
    if not documents:
        raise InvalidInput(f"{path}: no text found")
    return documents


# ---------------------------------------------------------------------------------------------
# Wikipedia markup


def strip_wiki_markup(raw: str) -> str:
    """Plain prose from wikitext: templates, tables, references, files, categories and
    trailing link sections removed; links replaced by their labels; one paragraph a block."""
    text = html.unescape(raw)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.DOTALL)
    text = re.sub(r"<ref[^>/]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL | re.IGNORECASE)
    text = re.sub(
        r"<(gallery|math|timeline|score|imagemap)[^>]*>.*?</\1>", "", text,
        flags=re.DOTALL | re.IGNORECASE,
    )  # fmt: skip
    text = _remove_nested(text, r"\{\{[^{}]*\}\}")
    text = _remove_nested(text, r"\{\|(?:(?!\{\|).)*?\|\}", flags=re.DOTALL)
    text = _replace_links(text)
    text = re.sub(r"\[(?:(?:https?|ftp):)?//[^\s\]]+\s*([^\]]*)\]", r"\1", text)
    text = re.sub(r"<[^>]+>", "", text)
    text = re.sub(r"'{2,}", "", text)
    return _paragraphs(text)


def _remove_nested(text: str, innermost: str, flags: int = 0) -> str:
    pattern = re.compile(innermost, flags)
    while True:
        text, count = pattern.subn("", text)
        if count == 0:
            return text


def _replace_links(text: str) -> str:
    pattern = re.compile(r"\[\[([^\[\]]*)\]\]")

    def label(match: re.Match[str]) -> str:
        inner = match.group(1)
        target = inner.split("|", 1)[0].strip().lower()
        # Files, categories and interlanguage links ("fr:Paris") carry no prose.
        if target.startswith(_LINK_PREFIXES) or re.match(r"^[a-z]{2,3}(-[a-z]+)?:", target):
            return ""
        return inner.rsplit("|", 1)[-1]

    while True:
        text, count = pattern.subn(label, text)
        if count == 0:
            return text


def _paragraphs(text: str) -> str:
    paragraphs: list[str] = []
    current: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            if heading.group(2).lower() in _TRAILING_SECTIONS:
                break
            line = ""
        if line.startswith(("|", "!", "{", "}")) or line.lower().startswith("__"):
            continue
        line = re.sub(r"^[*#:;]+\s*", "", line)
        if not line:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(line)
    if current:
        paragraphs.append(" ".join(current))
    kept = []
    for paragraph in paragraphs:
        paragraph = re.sub(r"\(\s*[,;]?\s*\)", "", " ".join(paragraph.split()))
        paragraph = re.sub(r"\s+([,.;:])", r"\1", paragraph)
        if len(paragraph.split()) >= _MIN_PARAGRAPH_WORDS:
            kept.append(paragraph)
    return "\n\n".join(kept)


def _first_words(text: str, count: int = 6) -> str:
    return " ".join(text.split()[:count])


# ---------------------------------------------------------------------------------------------
# Splits and chat formatting


def split_documents(
    documents: Sequence[Document], heldout_fraction: float, seed: int
) -> tuple[list[Document], list[Document]]:
    """(train, held-out), split by document with a seeded shuffle; at least one of each."""
    if len(documents) < 2:
        raise InvalidInput(
            f"the corpus has {len(documents)} document(s); at least 2 are needed to hold one out"
        )
    order = list(range(len(documents)))
    random.Random(seed).shuffle(order)
    heldout = max(1, min(len(documents) - 1, round(len(documents) * heldout_fraction)))
    return [documents[i] for i in order[heldout:]], [documents[i] for i in order[:heldout]]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(])")

_QUESTIONS = (
    "What is {title}?",
    "Tell me about {title}.",
    "Can you explain {title} in a few paragraphs?",
    "Write a short encyclopedia entry about {title}.",
    "I'm curious about {title}. What should I know?",
)
_ON_SENTENCE = (
    "Is it true that {sentence_question}?",
    "Explain this in simple words: {sentence}",
    "{sentence} Why is that?",
    'Can you give me more context on this? "{sentence}"',
)
_ON_PASSAGE = (
    "Summarize the following text in two sentences.\n\n{passage}",
    "Rewrite this paragraph so a child can understand it:\n\n{passage}",
    "What are the key facts in this passage?\n\n{passage}",
)


def sentences(text: str) -> list[str]:
    return [s.strip() for s in _SENTENCE_END.split(" ".join(text.split())) if s.strip()]


def chat_text(document: Document, tokenizer: ChatTokenizer, rng: random.Random) -> str:
    """The document as a chat conversation (tokenizer's template): a user turn built from
    its title, a sentence or a passage, then (mostly) an assistant turn with the text."""
    paragraphs = [p for p in document.text.split("\n\n") if p.strip()] or [document.text]
    passage = rng.choice(paragraphs)
    said = sentences(passage) or [passage]
    kind = rng.random()
    if kind < 0.4:
        user = rng.choice(_QUESTIONS).format(title=document.title)
        answer = passage
    elif kind < 0.7:
        sentence = rng.choice(said)
        question = sentence.rstrip(".!? ")
        question = question[:1].lower() + question[1:]
        user = rng.choice(_ON_SENTENCE).format(sentence=sentence, sentence_question=question)
        answer = " ".join(said[said.index(sentence) :][:4])
    else:
        user = rng.choice(_ON_PASSAGE).format(passage=passage)
        answer = " ".join(said[:2])
    turns = [{"role": "user", "content": user}]
    prompt_only = rng.random() < 0.25  # what a guard sees before generation starts
    if not prompt_only:
        turns.append({"role": "assistant", "content": answer})
    text = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=prompt_only)
    if not isinstance(text, str):
        raise InvalidInput("the tokenizer's chat template did not return text")
    return text
