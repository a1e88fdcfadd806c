"""From a conversation to the token ids a model runs, and what each token is.

:func:`render` is the one path from chat messages to rows: the transformers attach, the demo
host and the auditing commands (``guard features rank``, ``guard detectors calibrate`` and
``shadow``) all run a conversation through it, so the rows a detector is fitted on are the
rows it is served, with the same roles.

How the template's own tokens are told from the messages' content: the conversation is
rendered twice through the tokenizer's chat template (``apply_chat_template(...,
tokenize=False)``), once as it is and once with each message's content replaced by a
placeholder. The placeholders cut the second rendering into the template's own text, which
must then appear around the contents, in order, in the first rendering: that gives each
message's character span in the rendered prompt (a template that trims a message is
allowed for; one that changes a message otherwise is refused with ValueError). The rendered
prompt is tokenised once with ``return_offsets_mapping`` (a fast tokenizer is needed), which
is exactly what ``apply_chat_template(..., tokenize=True)`` runs, and each token takes the
role of the message whose content it covers; every other token (role headers, separators,
the assistant-turn opener, special tokens, and text the template adds on its own, such as
SmolLM2's default system prompt) is :attr:`RowRole.TEMPLATE`. A token that straddles
template text and content (a BPE merge across the boundary) counts as content.

No torch here: the tokenizer is duck-typed (a transformers fast tokenizer).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Final, NamedTuple

import numpy as np
from numpy.typing import NDArray

from guard.decision import RowRole

#: A message's ``role`` -> the role of its content's tokens. Other names: UNSPECIFIED
#: (every detector reads such rows).
MESSAGE_ROLES: Final[Mapping[str, RowRole]] = {
    "system": RowRole.SYSTEM, "developer": RowRole.SYSTEM, "user": RowRole.USER,
    "assistant": RowRole.ASSISTANT, "tool": RowRole.TOOL, "ipython": RowRole.TOOL,
    "function": RowRole.TOOL,
}

# Private-use code points: no template writes them, no message is expected to hold them.
_OPEN, _CLOSE = "\ue000", "\ue001"
_PLACEHOLDER = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


class RenderedChat(NamedTuple):
    """A rendered conversation: ``token_ids[i]`` is the token at position ``i`` and
    ``roles[i]`` its :class:`RowRole` value (int8). Unpacks as ``ids, roles``."""

    token_ids: list[int]
    roles: NDArray[np.int8]


def render(tokenizer: Any, messages: Sequence[Mapping[str, Any]], *,
           add_generation_prompt: bool = True, **template_kwargs: Any) -> RenderedChat:
    """The token ids of ``messages`` through the tokenizer's chat template (what
    ``apply_chat_template(messages, add_generation_prompt=...)`` returns), and each token's
    role: the content of a message has its message's role (:data:`MESSAGE_ROLES`), every
    other token is template markup.

    ``template_kwargs`` go to ``apply_chat_template`` (e.g. ``tools``). Raises TypeError for
    messages that are not ``{role, content}`` mappings with string content or a tokenizer
    without offsets (a slow tokenizer), ValueError when the template changes a message's
    text beyond trimming it (its tokens cannot be told from the template's).
    """
    checked = _checked(messages)
    text = _template(tokenizer, checked, add_generation_prompt, template_kwargs)
    placeholders = [{**m, "content": f"{_OPEN}{i}{_CLOSE}"} for i, m in enumerate(checked)]
    skeleton = _template(tokenizer, placeholders, add_generation_prompt, template_kwargs)
    spans = _content_spans(text, skeleton, checked)
    try:
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:  # transformers' slow tokenizers have no offsets
        raise TypeError("tokenizer: expected a fast tokenizer (render needs "
                        "return_offsets_mapping)") from exc
    ids = [int(t) for t in encoded["input_ids"]]
    offsets = encoded["offset_mapping"]
    char_roles = np.full(len(text) + 1, RowRole.TEMPLATE, dtype=np.int8)
    for start, stop, role in spans:
        char_roles[start:stop] = role
    content = np.r_[0, np.cumsum(char_roles[:-1] != RowRole.TEMPLATE)]
    roles = np.full(len(ids), RowRole.TEMPLATE, dtype=np.int8)
    for index, (start, stop) in enumerate(offsets):
        if stop > start and content[stop] > content[start]:  # covers some content
            first = start + int(np.argmax(char_roles[start:stop] != RowRole.TEMPLATE))
            roles[index] = char_roles[first]
    return RenderedChat(ids, roles)


def _checked(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    if isinstance(messages, str | bytes | Mapping) or not isinstance(messages, Sequence):
        raise TypeError(f"messages: expected a list of {{role, content}} mappings, found "
                        f"{type(messages).__qualname__}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{index}]: expected a mapping with role and content, "
                            f"found {type(message).__qualname__}")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str):
            raise TypeError(f"messages[{index}].role: expected a string, found {role!r}")
        if not isinstance(content, str):
            raise TypeError(f"messages[{index}].content: expected a string, found "
                            f"{type(content).__qualname__}")
        if _OPEN in content or _CLOSE in content:
            raise ValueError(f"messages[{index}].content: holds U+E000 or U+E001, which "
                             "render uses to find the content in the template")
        checked.append(dict(message))
    return checked


def _template(tokenizer: Any, messages: list[dict[str, Any]], add_generation_prompt: bool,
              template_kwargs: Mapping[str, Any]) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False,
                                         add_generation_prompt=add_generation_prompt,
                                         **template_kwargs)
    if not isinstance(text, str):
        raise TypeError(f"tokenizer.apply_chat_template: expected the rendered text, found "
                        f"{type(text).__qualname__}")
    return text


def _content_spans(text: str, skeleton: str, messages: list[dict[str, Any]]
                   ) -> list[tuple[int, int, RowRole]]:
    """(start, stop, role) of each message's content in ``text``, from the ``skeleton``
    (the same rendering with placeholders for the contents)."""
    parts = _PLACEHOLDER.split(skeleton)  # template, index, template, index, ..., template
    pieces, order = parts[0::2], [int(i) for i in parts[1::2]]
    spans: list[tuple[int, int, RowRole]] = []
    if not text.startswith(pieces[0]):
        raise ValueError("the chat template renders differently once the messages' content "
                         "is replaced: cannot tell the content's tokens from the template's")
    cursor = len(pieces[0])
    for slot, index in enumerate(order):
        if index >= len(messages):
            raise ValueError(f"the chat template wrote a placeholder for message {index} of "
                             f"{len(messages)}")
        content = messages[index]["content"]
        following = pieces[slot + 1]
        for variant in dict.fromkeys((content, content.strip(), content.rstrip(),
                                      content.lstrip())):
            stop = cursor + len(variant)
            if text.startswith(variant, cursor) and text.startswith(following, stop):
                break
        else:
            raise ValueError(f"messages[{index}].content: the chat template changes this "
                             "message's text (beyond trimming it): cannot tell its tokens "
                             "from the template's")
        if variant:
            role = MESSAGE_ROLES.get(str(messages[index]["role"]), RowRole.UNSPECIFIED)
            spans.append((cursor, stop, role))
        cursor = stop + len(following)
    if cursor != len(text):
        raise ValueError("the chat template renders differently once the messages' content "
                         "is replaced: cannot tell the content's tokens from the template's")
    return spans
