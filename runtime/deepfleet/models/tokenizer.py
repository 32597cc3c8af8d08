"""The tokenizer of a Hugging Face model directory: `tokenizer.json` (fast tokenizer) plus `tokenizer_config.json`
(special tokens, BOS handling) and the chat templates, wherever the publisher's transformers version put them.
No dependency on transformers."""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer as _HFTokenizer

DEFAULT_TEMPLATE = "default"
TOOL_TEMPLATE = "tool_use"  # transformers' name for the template it picks when tools are given


def _token_content(value: Any) -> str | None:
    # tokenizer_config.json stores special tokens either as strings or as AddedToken dicts
    if isinstance(value, dict):
        return value.get("content")
    return value


def load_chat_templates(model_dir: Path, config: dict[str, Any]) -> dict[str, str]:
    """Name -> jinja source. Older transformers keep `chat_template` in tokenizer_config.json (a string, or a
    list of {"name", "template"}); current save_pretrained writes `chat_template.jinja` and named ones under
    `additional_chat_templates/NAME.jinja`; processors write `chat_template.json`. Later sources win."""
    templates: dict[str, str] = {}
    inline = config.get("chat_template")
    if isinstance(inline, str):
        templates[DEFAULT_TEMPLATE] = inline
    elif isinstance(inline, list):
        templates.update({t["name"]: t["template"] for t in inline})
    processor = model_dir / "chat_template.json"
    if processor.is_file():
        templates[DEFAULT_TEMPLATE] = json.loads(processor.read_text())["chat_template"]
    if (model_dir / "chat_template.jinja").is_file():
        templates[DEFAULT_TEMPLATE] = (model_dir / "chat_template.jinja").read_text()
    for path in sorted((model_dir / "additional_chat_templates").glob("*.jinja")):
        templates[path.stem] = path.read_text()
    return templates


def _generation_eos_ids(model_dir: Path) -> list[int]:
    # generation_config.json often lists more end tokens than config.json (e.g. Llama 3's <|eot_id|>)
    path = model_dir / "generation_config.json"
    eos = json.loads(path.read_text()).get("eos_token_id") if path.is_file() else None
    return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))


class Tokenizer:
    """Encode/decode and chat templating for one model directory."""

    def __init__(self, model_dir: str | Path, generation_eos_ids: list[int] | None = None):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: missing (a Hugging Face fast tokenizer file is required)")
        self._tok = _HFTokenizer.from_file(str(path))
        cfg_path = model_dir / "tokenizer_config.json"
        self.config: dict[str, Any] = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
        self.bos_token = _token_content(self.config.get("bos_token"))
        self.eos_token = _token_content(self.config.get("eos_token"))
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos_token = bool(self.config.get("add_bos_token", False)) and self.bos_token_id is not None
        self.chat_templates = load_chat_templates(model_dir, self.config)
        eos = {*(generation_eos_ids or []), *_generation_eos_ids(model_dir)}
        if self.eos_token and self._tok.token_to_id(self.eos_token) is not None:
            eos.add(self._tok.token_to_id(self.eos_token))
        self.eos_token_ids: set[int] = eos
        self.all_special_ids: list[int] = sorted(
            idx for idx, tok in self._tok.get_added_tokens_decoder().items() if tok.special
        )
        self._compiled: dict[str, Any] = {}

    def replace_chat_templates(self, source: str) -> None:
        """Serve `source` for every conversation instead of the model's own templates (vLLM's --chat-template)."""
        self.chat_templates = {DEFAULT_TEMPLATE: source}
        self._compiled.clear()

    @property
    def chat_template(self) -> str | None:
        return self.chat_templates.get(DEFAULT_TEMPLATE)

    @property
    def backend(self):
        """The `tokenizers.Tokenizer` itself (what `DecodeStream` steps with)."""
        return self._tok

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self._tok.encode(text, add_special_tokens=add_special_tokens).ids
        # DeepSeek configs ask for BOS through tokenizer_config.json rather than a post-processor
        if add_special_tokens and self.add_bos_token and (not ids or ids[0] != self.bos_token_id):
            ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def template_name(self, tools: list[dict[str, Any]] | None = None, name: str | None = None) -> str:
        """Which template formats a conversation: the one asked for, else `tool_use` when tools are given and
        the model has one, else the default (or the only one), as transformers chooses."""
        if name is not None:
            if name not in self.chat_templates:
                raise ValueError(f"chat_template: no template named {name!r} (this model has "
                                 f"{sorted(self.chat_templates) or 'none'})")
            return name
        if tools and TOOL_TEMPLATE in self.chat_templates:
            return TOOL_TEMPLATE
        if DEFAULT_TEMPLATE in self.chat_templates:
            return DEFAULT_TEMPLATE
        if len(self.chat_templates) == 1:
            return next(iter(self.chat_templates))
        if not self.chat_templates:
            raise ValueError("no chat template (neither chat_template.jinja nor tokenizer_config.json's "
                             "chat_template), so chat messages cannot be formatted")
        raise ValueError(f"chat_template: this model has several templates and no default: choose one of "
                         f"{sorted(self.chat_templates)}")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, template: str | None = None,
                            **kwargs: Any) -> str:
        """Render a conversation. `tools`: OpenAI tool definitions, passed to the template as transformers does;
        `kwargs`: extra template variables (vLLM's chat_template_kwargs, e.g. enable_thinking)."""
        name = self.template_name(tools, template)
        compiled = self._compiled.get(name)
        if compiled is None:
            compiled = self._compiled[name] = compile_template(self.chat_templates[name])
        return compiled.render(
            **kwargs,
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )


def compile_template(source: str) -> Any:
    """A chat template compiled as transformers renders it; jinja2.TemplateSyntaxError names the line."""
    return _environment().from_string(source)


def _environment() -> Any:
    """The sandboxed jinja2 environment transformers renders chat templates in (same globals and filters)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
