"""The recipe's `chat_template:` as mergekit reads it (a name, `auto`, Jinja text) and as a template file:
the merged model ships `chat_template.jinja`, which transformers applies."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml
from transformers import AutoTokenizer

from evomerge.errors import ConfigError
from evomerge.merge import parse_recipe, run_merge

CONVERSATION = [{"role": "user", "content": "2+2"}, {"role": "assistant", "content": "4"}]
# Written independently of evomerge's template: a minimal format that shows which template was applied.
PARENT_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


def merged(family: dict[str, Path], out: Path, chat_template: str, models: list[Path] | None = None) -> Path:
    recipe = {
        "method": "linear", "chat_template": chat_template,
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (models or [family["ft1"], family["ft2"]])],
    }
    run_merge(parse_recipe(recipe), out)
    return out


def test_named_template_is_written_and_applied(tiny_family, tmp_path):
    out = merged(tiny_family, tmp_path / "chatml", "chatml")
    assert (out / "chat_template.jinja").is_file()
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    text = AutoTokenizer.from_pretrained(out).apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\n2+2<|im_end|>\n<|im_start|>assistant\n4<|im_end|>\n<|im_start|>assistant\n"
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["chat_template"] == "chatml"


def test_template_file_is_inlined_for_mergekit(tiny_family, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text(PARENT_TEMPLATE)
    out = merged(tiny_family, tmp_path / "file", str(template))
    assert (out / "chat_template.jinja").read_text() == PARENT_TEMPLATE
    assert AutoTokenizer.from_pretrained(out).apply_chat_template(CONVERSATION, tokenize=False) == "[user] 2+2\n[assistant] 4\n"
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["chat_template"] == PARENT_TEMPLATE


def test_auto_takes_the_template_most_parents_carry(tiny_family, tmp_path):
    parents = []
    for name, template in (("a", PARENT_TEMPLATE), ("b", PARENT_TEMPLATE), ("c", None)):
        parent = Path(shutil.copytree(tiny_family["ft1"], tmp_path / name))
        if template is not None:
            (parent / "chat_template.jinja").write_text(template)
        parents.append(parent)
    out = merged(tiny_family, tmp_path / "auto", "auto", parents[::-1])
    assert (out / "chat_template.jinja").read_text() == PARENT_TEMPLATE
    none = merged(tiny_family, tmp_path / "none", "auto", [tiny_family["ft1"], tiny_family["ft2"]])
    assert not (none / "chat_template.jinja").exists()


def test_unknown_template_name_is_refused_at_load(tiny_family):
    with pytest.raises(ConfigError, match="field 'chat_template' = 'chatlm' is not a template name"):
        parse_recipe({"method": "linear", "chat_template": "chatlm", "parameters": {"weight": 1.0},
                      "models": [{"model": str(tiny_family["ft1"])}]})


def test_long_jinja_text_is_taken_as_the_template(tiny_family, tmp_path):
    # Longer than any file name may be: Jinja text must never be looked up as a path.
    text = "{# " + "x" * 400 + " #}" + PARENT_TEMPLATE
    out = merged(tiny_family, tmp_path / "inline", text)
    assert (out / "chat_template.jinja").read_text() == text
