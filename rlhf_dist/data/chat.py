"""Conversational rows (TRL's format: a list of ``{"role", "content"}`` messages) and chat templates.

A prompt, a response, a chosen or a rejected answer may be plain text or a messages list. ``data.chat_template``
decides how a prompt becomes the text the policy sees:

- ``auto``: a messages list goes through the tokenizer's template with the generation prompt appended; plain text is
  used as it is (so a plain-text task is unchanged by it);
- ``none``: no template; a messages list is an error;
- ``PATH``: that Jinja template, for every prompt (plain text as one user turn).

An answer given as messages is the text the template adds after the prompt (prompt + answer rendered, minus the
prompt rendered with its generation prompt: TRL's prompt-completion split), trailing whitespace dropped, since
generation stops at EOS; a plain-text answer is that text. Either way the answer's tokens are what a policy that saw
the rendered prompt would generate.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from rlhf_dist.config import ConfigError
from rlhf_dist.data.readers import DataError

ROLE, CONTENT = "role", "content"
KEYWORDS = ("auto", "none")

Conversation = list[dict[str, str]]


def is_messages(dtype: pa.DataType) -> bool:
    """A list of structs: a column of messages lists (whatever other fields the structs carry)."""
    return (pa.types.is_list(dtype) or pa.types.is_large_list(dtype)) and pa.types.is_struct(dtype.value_type)


@dataclass(frozen=True)
class ChatFormat:
    """``data.chat_template`` resolved. plain: template plain-text prompts too (as one user turn); messages: accept
    messages lists (False: they are an error); template: Jinja text replacing the tokenizer's (None: its own)."""

    plain: bool = False
    messages: bool = True
    template: str | None = None
    key: str = "data.chat_template"

    @classmethod
    def from_setting(cls, setting: str, key: str = "data.chat_template") -> ChatFormat:
        if setting == "auto":
            return cls(key=key)
        if setting == "none":
            return cls(messages=False, key=key)
        path = Path(os.path.expanduser(setting))
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            reason = getattr(err, "strerror", None) or type(err).__name__
            raise ConfigError(
                key, f"{setting!r} is neither auto, none nor a readable Jinja file ({reason}); fix the path"
            ) from None
        if not text.strip():
            raise ConfigError(key, f"{setting!r} is empty; write a Jinja chat template in it, or use auto")
        return cls(plain=True, template=text, key=key)

    def render(
        self, tokenizer, conversations: list[Conversation], generation_prompt: bool, where: Callable[[int], str]
    ) -> list[str]:
        """The conversations as text through the template; ``where(i)`` names row i (file, row, column) in errors."""
        if not self.messages:
            raise DataError(
                f"{where(0)}: a messages list, but {self.key}=none; set {self.key}=auto (the tokenizer's template) "
                f"or a Jinja file, or give the column as plain text"
            )
        if self.template is None and not getattr(tokenizer, "chat_template", None):
            raise DataError(
                f"{where(0)}: a messages list, but the tokenizer has no chat template; set {self.key}=PATH to a "
                f"Jinja template, or give the column as plain text"
            )
        if not conversations:
            return []
        kwargs = dict(chat_template=self.template, add_generation_prompt=generation_prompt, tokenize=False)
        try:
            return list(tokenizer.apply_chat_template(conversations, **kwargs))
        except Exception:  # noqa: BLE001 - a template error (raise_exception, a bad role): found row by row below
            pass
        out = []
        for i, conversation in enumerate(conversations):
            try:
                out.append(tokenizer.apply_chat_template(conversation, **kwargs))
            except Exception as err:  # noqa: BLE001 - Jinja raises many types; the message is the user's clue
                message = " ".join(str(err).split())
                raise DataError(
                    f"{where(i)}: the chat template fails on this row ({type(err).__name__}: {message}); fix the "
                    f"row or {self.key}"
                ) from None
        return out

    def prompts(
        self, tokenizer, prompts: list[str] | list[Conversation], where: Callable[[int], str]
    ) -> tuple[list[str], bool]:
        """The prompts as the policy sees them, and whether they went through a template (then they are tokenised
        without the tokenizer's own special tokens: the template writes those it wants)."""
        if not prompts or isinstance(prompts[0], str):
            if not self.plain:
                return list(prompts), False
            conversations = [[{ROLE: "user", CONTENT: p}] for p in prompts]
            return self.render(tokenizer, conversations, True, where), True
        return self.render(tokenizer, prompts, True, where), True

    def completions(
        self,
        tokenizer,
        prompts: list[Conversation],
        rendered_prompts: list[str],
        answers: list[Conversation],
        where: Callable[[int], str],
    ) -> list[str]:
        """Each answer (a messages list) as the text the template puts after its rendered prompt."""
        full = self.render(tokenizer, [p + a for p, a in zip(prompts, answers)], False, where)
        out = []
        for i, (text, prefix) in enumerate(zip(full, rendered_prompts)):
            if not text.startswith(prefix):
                raise DataError(
                    f"{where(i)}: the chat template renders prompt + answer so that it does not start with the "
                    f"prompt as rendered for generation, so the answer cannot be cut out; use a template whose "
                    f"generation prompt is the start of the assistant turn ({self.key})"
                )
            out.append(text[len(prefix) :].rstrip())
        return out


AUTO = ChatFormat()
