"""Conversations -> KTO examples: ``{"messages": [...], "label": bool}`` rows, and rows whose
assistant turns carry their own labels.

A conversation is rendered with the tokenizer's chat template (with its ``tools`` column, as
transformers passes tools to a template) and cut into pieces that alternate between context
(system, user and tool turns, the template's headers) and assistant turns (their content, tool
calls and end-of-turn tokens, as the template writes them). Where the pieces come from:

* a template with generation markers (``{% generation %}``) says itself which characters an
  assistant wrote (transformers' ``return_assistant_tokens_mask`` machinery);
* any other template is rendered once per assistant turn k: the conversation before it with the
  generation prompt, and up to it without. Both must be prefixes of the whole rendering (and the
  first of the second), else the template rewrites earlier turns (as some strip reasoning from
  past turns) and the turn cannot be split off: one error naming the row.

Each piece is tokenized on its own, as megakto tokenizes a chat row's prompt and completion apart,
so a token never straddles a context/assistant boundary and the ids of a prefix are shared by
every example built on it.

**Row labels.** The prompt is the context before the first assistant turn; the completion is the
rest up to the end of the last assistant turn, its context pieces stored as context ids
(:mod:`megakto.data.context_ids`): the sum of log-probs over every assistant token is the row's
log pi(y|x) of eq. (7). No EOS is appended: the template's end-of-turn tokens close each turn.

**Turn labels.** Each labelled assistant turn is one example: its prompt the whole conversation
before it (earlier assistant turns included, as context), its completion that turn alone.

**KL rows** (eq. 7's z_ref needs mismatched pairs) need nothing new: the pair (x_i, y_j) is row
i's prompt followed by row j's completion, so for a conversation j it is i's opening context
followed by j's assistant turns with j's own user and tool turns between them, scored on j's
assistant tokens only. ``prompt_key`` hashes the prompt text, so two rows that open alike are
never paired with each other.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple

from megakto.data.context_ids import as_context
from megakto.errors import DataError, ModelError

__all__ = ["Piece", "Example", "render_pieces", "examples", "conversation_texts"]

_GENERATION = re.compile(r"\{%-?\s*generation\s*-?%\}")


class Piece(NamedTuple):
    text: str
    turn: int | None  # index of the assistant message it renders; None for context


class Example(NamedTuple):
    prompt_text: str
    prompt_ids: list[int]
    completion_ids: list[int]  # context inside it as context ids
    completion_text: str
    label: bool


def _render(tokenizer, messages, tools, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=generation_prompt,
                                         tokenize=False)


def _where(source: str, row: int) -> str:
    return f"{source}: row {row}: field 'messages'"


def render_pieces(tokenizer, messages: list[dict], tools: list | None, source: str, row: int) -> list[Piece]:
    """The conversation's rendering cut into context and assistant pieces, ending with the last
    assistant turn (context after it is never scored and is left out)."""
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ModelError(f"tokenizer {type(tokenizer).__name__} has no chat_template, but {source} row {row} "
                         f"is a conversation")
    turns = [k for k, m in enumerate(messages) if m["role"] == "assistant"]
    if isinstance(template, str) and _GENERATION.search(template):
        text, spans = _marked_spans(tokenizer, messages, tools)
        if len(spans) != len(turns):
            raise DataError(f"{_where(source, row)}: the chat template marks {len(spans)} generation spans for "
                            f"{len(turns)} assistant turns, so the turns cannot be told apart")
    else:
        text, spans = _prefix_spans(tokenizer, messages, tools, turns, source, row)
    pieces, pos = [], 0
    for k, (start, end) in zip(turns, spans):
        if start > pos:
            pieces.append(Piece(text[pos:start], None))
        pieces.append(Piece(text[start:end], k))
        pos = end
    return pieces


def _marked_spans(tokenizer, messages, tools):
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, indices = render_jinja_template(
        conversations=[messages], tools=tools, chat_template=tokenizer.chat_template,
        return_assistant_tokens_mask=True, **tokenizer.special_tokens_map)
    return rendered[0], [tuple(span) for span in indices[0]]


def _prefix_spans(tokenizer, messages, tools, turns, source, row):
    whole = _render(tokenizer, messages, tools, False)
    spans, pos = [], 0
    for k in turns:
        before = _render(tokenizer, messages[:k], tools, True)
        upto = _render(tokenizer, messages[:k + 1], tools, False)
        if not (whole.startswith(upto) and upto.startswith(before) and len(before) >= pos):
            raise DataError(f"{_where(source, row)}: message {k + 1}: the chat template's rendering of the "
                            f"conversation up to this assistant turn is not a prefix of its rendering of the whole "
                            f"conversation, so the turn cannot be split off (a template that rewrites earlier "
                            f"turns needs generation markers)")
        if len(upto) == len(before):
            raise DataError(f"{_where(source, row)}: message {k + 1}: the chat template renders this assistant "
                            f"turn as nothing")
        spans.append((len(before), len(upto)))
        pos = len(upto)
    return whole, spans


def _tokenize_pieces(tokenizer, pieces: list[Piece]) -> list[list[int]]:
    """Each piece's ids; the first gets the tokenizer's BOS unless the template already wrote it."""
    bos = tokenizer.bos_token
    first = pieces[0].text
    add_bos = not (bool(bos) and first.startswith(bos))
    ids = [tokenizer(first, add_special_tokens=add_bos)["input_ids"]]
    rest = [p.text for p in pieces[1:]]
    if rest:
        ids.extend(tokenizer(rest, add_special_tokens=False)["input_ids"])
    return ids


def examples(tokenizer, conversation: str, label: bool, source: str, row: int) -> list[Example]:
    """The KTO examples of one conversation row (``conversation``: the JSON that
    :func:`megakto.data.rows.load_rows` stores): one per labelled assistant turn when its turns
    carry labels, else one with the row's ``label``."""
    conv = json.loads(conversation)
    messages, tools = conv["messages"], conv.get("tools")
    pieces = render_pieces(tokenizer, messages, tools, source, row)
    ids = _tokenize_pieces(tokenizer, pieces)
    if not any(m.get("label") is not None for m in messages):
        completion = []
        for piece, piece_ids in zip(pieces[1:], ids[1:]):
            completion.extend(piece_ids if piece.turn is not None else as_context(piece_ids))
        return [Example(pieces[0].text, ids[0], completion, "".join(p.text for p in pieces[1:]), bool(label))]
    out = []
    for n, piece in enumerate(pieces):
        turn_label = messages[piece.turn].get("label") if piece.turn is not None else None
        if turn_label is None:
            continue
        prompt_ids = [t for piece_ids in ids[:n] for t in piece_ids]
        out.append(Example("".join(p.text for p in pieces[:n]), prompt_ids, list(ids[n]), piece.text,
                           bool(turn_label)))
    return out


def conversation_texts(tokenizer, conversation: str, source: str, row: int) -> tuple[str, str]:
    """(prompt text, completion text) of a row-labelled reading of the conversation, for the
    tokenizer checks' decode sample."""
    conv = json.loads(conversation)
    pieces = render_pieces(tokenizer, conv["messages"], conv.get("tools"), source, row)
    return pieces[0].text, "".join(p.text for p in pieces[1:])
