"""The recipe's `chat_template:` key, with mergekit's values: a template name, `auto`, or Jinja text.

evomerge also takes a path to a template file. The merged model gets the template as
`chat_template.jinja` (the file transformers reads, and the one mergekit writes); a `chat_template` entry
in the donor's `tokenizer_config.json` is removed so that only one template ships.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from evomerge.errors import ConfigError, ModelError

TEMPLATE_FILE = "chat_template.jinja"
# Written for evomerge from the formats' published descriptions (ChatML: `<|im_start|>role\n...<|im_end|>`;
# Llama 3: header ids and `<|eot_id|>`; Alpaca: `### Instruction:` / `### Response:` blocks).
NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
}
# mergekit's rule for telling Jinja text from a misspelt name: text is at least this long and has a brace.
MIN_TEMPLATE_CHARS = 20


def is_template_text(value: str) -> bool:
    return len(value) >= MIN_TEMPLATE_CHARS and "{" in value


def is_template_file(value: str) -> bool:
    """A value naming a template file (Jinja text is never taken for a path: it may be too long for one)."""
    return not is_template_text(value) and Path(value).is_file()


def check_chat_template(value: str, source: str) -> None:
    """Refuse, at recipe load, a value that is neither `auto`, a known name, Jinja text nor a file."""
    if value == "auto" or value in NAMED_TEMPLATES or is_template_text(value) or is_template_file(value):
        return
    names = ", ".join(["auto", *sorted(NAMED_TEMPLATES)])
    raise ConfigError(
        f"{source}: field 'chat_template' = {value!r} is not a template name ({names}), Jinja text or an existing file"
    )


def model_chat_template(model_dir: Path) -> str | None:
    """A model's own chat template: its `chat_template.jinja`, else `tokenizer_config.json`'s entry."""
    jinja = model_dir / TEMPLATE_FILE
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    config = model_dir / "tokenizer_config.json"
    if not config.is_file():
        return None
    try:
        template = json.loads(config.read_text(encoding="utf-8")).get("chat_template")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
        raise ModelError(f"tokenizer config {config} is not a JSON object: {error}") from None
    if isinstance(template, list):  # several named templates: transformers uses "default"
        template = next((t.get("template") for t in template if t.get("name") == "default"), None)
    return template if isinstance(template, str) and template.strip() else None


def resolve_chat_template(value: str, parent_dirs: Sequence[Path]) -> str | None:
    """The template text `value` stands for; `auto` is the template most parents carry (None if none does)."""
    if value == "auto":
        found = [t.strip() for t in (model_chat_template(d) for d in parent_dirs) if t]
        return Counter(found).most_common(1)[0][0] if found else None
    if value in NAMED_TEMPLATES:
        return NAMED_TEMPLATES[value]
    if is_template_file(value):
        try:
            return Path(value).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ConfigError(f"chat template file {value} cannot be read: {error}") from None
    if is_template_text(value):
        return value
    raise ConfigError(f"chat template file {value} does not exist")


def without_chat_template(tokenizer_config_text: str) -> str:
    """The donor's `tokenizer_config.json` minus its template, so the written `chat_template.jinja` is the one."""
    config = json.loads(tokenizer_config_text)
    config.pop("chat_template", None)
    return json.dumps(config, indent=2, ensure_ascii=False)
