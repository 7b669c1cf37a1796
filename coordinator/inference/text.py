"""Text <-> tokens for a served model, as `transformers` would do it from the same files.

``tokenizer.json`` is applied with its post-processor (``add_special_tokens=True``, e.g. a
Llama BOS), like ``AutoTokenizer(...)(text)``; decoding skips special tokens. Without a
tokenizer.json the model's byte-level tokenizer is used. Chat prompts use the checkpoint's
``chat_template`` (tokenizer_config.json, rendered with jinja2) when it has one, else a plain
"role: content" transcript ending with "assistant:".
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from swarm.errors import InvalidRequestError
from swarm.model.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 1 << 20
ROLES = ("system", "user", "assistant", "tool")


class TextCodec:
    def __init__(self, model_dir: Path, *, vocab_size: int) -> None:
        model_dir = Path(model_dir)
        self._fallback = load_tokenizer(model_dir, vocab_size=vocab_size)
        self.eos_token_id = self._fallback.eos_token_id
        self.bos_token_id = self._fallback.bos_token_id
        self._tok = None
        if (model_dir / "tokenizer.json").is_file():
            from tokenizers import Tokenizer

            self._tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.chat_template: str | None = None
        self._specials: dict[str, str] = {}
        cfg = model_dir / "tokenizer_config.json"
        if cfg.is_file():
            try:
                data = json.loads(cfg.read_text())
                tmpl = data.get("chat_template")
                self.chat_template = tmpl if isinstance(tmpl, str) else None
                for key in ("bos_token", "eos_token"):
                    v = data.get(key)
                    v = v.get("content") if isinstance(v, dict) else v
                    if isinstance(v, str):
                        self._specials[key] = v
            except (OSError, json.JSONDecodeError):
                log.warning("ignoring unreadable %s", cfg)

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str) or len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequestError(f"the prompt must be a string of at most {MAX_PROMPT_CHARS} characters")
        if self._tok is not None:
            return list(self._tok.encode(text, add_special_tokens=True).ids)
        return self._fallback.encode(text)

    def decode(self, ids: list[int]) -> str:
        if self._tok is not None:
            return self._tok.decode(list(ids), skip_special_tokens=True)
        return self._fallback.decode(ids)

    def chat_prompt(self, messages: list) -> str:
        """The prompt text for OpenAI-style chat messages (validated)."""
        if not isinstance(messages, list) or not 1 <= len(messages) <= 1024:
            raise InvalidRequestError("messages must be a list of 1..1024 {role, content} objects")
        clean = []
        for m in messages:
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise InvalidRequestError(f"each message needs a role among {ROLES} and a content string")
            content = m.get("content")
            if isinstance(content, list):  # [{"type": "text", "text": ...}]
                parts = [p.get("text") for p in content if isinstance(p, dict) and p.get("type") == "text"]
                if any(not isinstance(p, str) for p in parts):
                    raise InvalidRequestError("only text content parts are supported")
                content = "".join(parts)
            if not isinstance(content, str):
                raise InvalidRequestError("message content must be a string")
            clean.append({"role": m["role"], "content": content})
        if self.chat_template:
            try:
                import jinja2
                from jinja2.sandbox import ImmutableSandboxedEnvironment

                env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
                return env.from_string(self.chat_template).render(
                    messages=clean, add_generation_prompt=True, **self._specials
                )
            except Exception as exc:  # noqa: BLE001 -- a broken template must not break serving
                log.warning("chat template failed (%s); using the plain transcript", exc)
        lines = [f"{m['role']}: {m['content']}" for m in clean]
        return "\n".join(lines) + "\nassistant:"
