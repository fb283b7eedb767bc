"""The bad-input corpus (`tests/bad_inputs/manifest.yaml`) through the real CLI, one process per case.

Each case runs the console script's entry point in its own process, forked from one that imported the
CLI's modules once (the `evomerge_cli` fixture: start-up would otherwise be most of the time). Every case
must exit 2 with exactly one line on stderr — one sentence containing the case's fragment — no
traceback anywhere, and nothing written: the case's scratch directory and every model directory are
listed (names, sizes, mtimes) before and after. Broken checkpoints are derived at test time from the
`tiny_llama` fixture by editing bytes, so no binary blobs live in git.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from transformers import GPT2Config, GPT2LMHeadModel

from cli_forkserver import CliServer
from conftest import TEST_CHARACTERS, read_tensors

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "manifest.yaml").read_text())["cases"]


def split_header(weights: Path) -> tuple[dict, bytes]:
    """A safetensors file as (header JSON, data bytes)."""
    raw = weights.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + length]), raw[8 + length :]


def join_header(header: dict, data: bytes) -> bytes:
    """A safetensors file from a header and data, the header padded to 8 bytes as the format asks."""
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text + data


def corrupt_header(model: Path) -> None:
    """Garbage where the JSON header starts (a damaged download)."""
    weights = model / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[8:40] = b"\x00\xff" * 16
    weights.write_bytes(bytes(raw))


def truncate(model: Path) -> None:
    """Drop the last third of the file (an interrupted copy)."""
    weights = model / "model.safetensors"
    raw = weights.read_bytes()
    weights.write_bytes(raw[: 2 * len(raw) // 3])


def lie_about_shape(model: Path) -> None:
    """A well-formed header whose first tensor claims one more row than its byte range holds."""
    weights = model / "model.safetensors"
    header, data = split_header(weights)
    name = min(k for k in header if k != "__metadata__")
    header[name]["shape"][0] += 1
    weights.write_bytes(join_header(header, data))


def nan_weights(model: Path) -> None:
    """Valid header, every weight NaN: any code that reads these weights sees garbage, not an error."""
    weights = model / "model.safetensors"
    header, data = split_header(weights)
    weights.write_bytes(join_header(header, b"\xff" * len(data)))


def to_pickle(model: Path) -> None:
    """The same weights as a pickled `pytorch_model.bin` (pickles can run code on load)."""
    torch.save(read_tensors(model), model / "pytorch_model.bin")
    (model / "model.safetensors").unlink()


def ask_for_remote_code(model: Path) -> None:
    """A config that maps the auto classes to code shipped with the checkpoint."""
    config_path = model / "config.json"
    config = json.loads(config_path.read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    config_path.write_text(json.dumps(config))
    (model / "modeling_evil.py").write_text("raise SystemExit('remote code ran')\n")


def edit_json(file: Path, change: Callable[[dict], None]) -> None:
    """Rewrite a JSON file through `change`, which edits the parsed object in place."""
    data = json.loads(file.read_text())
    change(data)
    file.write_text(json.dumps(data))


def ask_for_remote_tokenizer(model: Path) -> None:
    """Only the tokenizer config maps an auto class to shipped code."""
    edit_json(model / "tokenizer_config.json", lambda c: c.update(auto_map={"AutoTokenizer": ["tok_evil.Evil", None]}))


def claim_more_layers(model: Path) -> None:
    """config.json says 6 layers; the tensors hold 4."""
    edit_json(model / "config.json", lambda config: config.update(num_hidden_layers=6))


def shard(model: Path, locate: Callable[[Path, str], str] | None = None) -> None:
    """Split the weights into two shards with an index; `locate(model, shard)` says how the index names one."""
    tensors = read_tensors(model)
    names = sorted(tensors)
    weight_map = {}
    for index, part in enumerate((names[: len(names) // 2], names[len(names) // 2 :]), start=1):
        file = f"model-0000{index}-of-00002.safetensors"
        save_file({name: tensors[name] for name in part}, str(model / file), metadata={"format": "pt"})
        written = locate(model, file) if locate else file
        weight_map.update(dict.fromkeys(part, written))
    (model / "model.safetensors").unlink()
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def index_with_number(model: Path) -> None:
    shard(model)
    edit_json(model / "model.safetensors.index.json", lambda index: index["weight_map"].update({"lm_head.weight": 2}))


def escaping_index(*, absolute: bool) -> Callable[[Path], None]:
    """An index naming its second shard by a path outside the model directory (`../outside_NAME/x...` or
    absolute), where that shard really is: a reader following the path would succeed."""

    def edit(model: Path) -> None:
        outside = model.parent / f"outside_{model.name}" / "x.safetensors"

        def locate(model: Path, file: str) -> str:
            if not file.startswith("model-00002"):
                return file
            outside.parent.mkdir()
            shutil.move(model / file, outside)
            return str(outside) if absolute else f"../{outside.parent.name}/x.safetensors"

        shard(model, locate)

    return edit


def metadata_list(model: Path) -> None:
    """A header whose __metadata__ is a list instead of a string map."""
    weights = model / "model.safetensors"
    header, data = split_header(weights)
    header["__metadata__"] = ["format", "pt"]
    weights.write_bytes(join_header(header, data))


def vocabulary_id_text(model: Path) -> None:
    edit_json(model / "tokenizer.json", lambda tok: tok["model"]["vocab"].update({"a": "7"}))


def added_token_without_content(model: Path) -> None:
    edit_json(model / "tokenizer.json", lambda tok: tok["added_tokens"][0].pop("content"))


def lora_rank_mismatch(model: Path) -> None:
    """Turn the copy into a PEFT adapter over its own former weights (moved to `base/`), whose q_proj
    factors disagree on the rank: A is [2, 32], B is [32, 3]."""
    base = model / "base"
    base.mkdir()
    for file in list(model.iterdir()):
        if file != base:
            shutil.move(file, base / file.name)
    rows, cols = read_tensors(base)["model.layers.0.self_attn.q_proj.weight"].shape
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": torch.ones(2, cols), f"{prefix}.lora_B.weight": torch.ones(rows, 3)},
              str(model / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "base_model_name_or_path": str(base)}
    (model / "adapter_config.json").write_text(json.dumps(config))


def make_gpt2(out_dir: Path, llama: Path) -> Path:
    """A tiny GPT-2 with the same depth and tokenizer as `llama` (only the architecture differs)."""
    torch.manual_seed(5)
    config = GPT2Config(vocab_size=len(TEST_CHARACTERS) + 4, n_embd=32, n_layer=4, n_head=4, n_positions=128)
    GPT2LMHeadModel(config).save_pretrained(out_dir, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (llama / name).is_file():
            shutil.copy(llama / name, out_dir / name)
    return out_dir


# name -> (tiny_llama seed, tiny_llama options, edit of a copy); None edits mean the fixture itself.
MODEL_VARIANTS: dict[str, tuple[int, dict, Callable[[Path], None] | None]] = {
    "llama0": (0, {}, None),
    "llama1": (1, {}, None),
    "llama2": (2, {}, None),
    "wide": (1, {"hidden_size": 48}, None),
    # Same vocabulary size, one character swapped: only the token -> id map differs.
    "othertok": (1, {"vocab_characters": TEST_CHARACTERS.replace("z", "!")}, None),
    "corrupt": (1, {}, corrupt_header),
    "truncated": (1, {}, truncate),
    "lying": (1, {}, lie_about_shape),
    "pickle": (1, {}, to_pickle),
    "remote": (0, {}, ask_for_remote_code),
    # A private copy: the overwrite-a-parent case must not be able to touch a shared session model.
    "ownparent": (0, {}, lambda path: None),
    "nanweights0": (0, {}, nan_weights),
    "nanweights1": (1, {}, nan_weights),
    "nanweights2": (2, {}, nan_weights),
    "remotetok": (1, {}, ask_for_remote_tokenizer),
    "deepconfig": (1, {}, claim_more_layers),
    "indexnumber": (1, {}, index_with_number),
    "indexescape": (1, {}, escaping_index(absolute=False)),
    "indexabsolute": (1, {}, escaping_index(absolute=True)),
    "metadatalist": (1, {}, metadata_list),
    "vocabtext": (1, {}, vocabulary_id_text),
    "addednocontent": (1, {}, added_token_without_content),
    "lorarank": (1, {}, lora_rank_mismatch),
}


@pytest.fixture(scope="module")
def models(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """Every placeholder model of the corpus, plus a GPT-2 and a directory that does not exist."""
    root = tmp_path_factory.mktemp("bad_models")
    paths: dict[str, Path] = {}
    for name, (seed, options, edit) in MODEL_VARIANTS.items():
        source = tiny_llama(seed, **options)
        if edit is None:
            paths[name] = source
            continue
        paths[name] = root / name
        shutil.copytree(source, paths[name])
        edit(paths[name])
    paths["gpt2"] = make_gpt2(root / "gpt2", paths["llama0"])
    paths["missing"] = root / "no_such_model"
    return paths


def substitute(text: str, values: dict[str, Path]) -> str:
    for name, value in values.items():
        text = text.replace(f"@{name}@", str(value))
    return text


def listing(*roots: Path) -> dict[str, tuple[int, int]]:
    """Every file under `roots` with its size and mtime (what 'nothing written' is checked against)."""
    found: dict[str, tuple[int, int]] = {}
    for root in roots:
        for path in [root, *root.rglob("*")] if root.exists() else []:
            stat = path.stat()
            # A directory's own mtime moves when a refused command removes what it created; its
            # entries are what count, and each of them is listed here too.
            found[str(path)] = (stat.st_size, stat.st_mtime_ns) if path.is_file() else (-1, 0)
    return found


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    before: dict[str, tuple[int, int]]
    after: dict[str, tuple[int, int]]
    args: list[str]


def run_case(case: dict, work: Path, models: dict[str, Path], cli: CliServer) -> Outcome:
    """Copy the corpus into `work` (placeholders filled in), run the case there, list before and after."""
    values = {"work": work, **models}
    work.mkdir(parents=True)
    for source in CORPUS.iterdir():
        if source.name != "manifest.yaml":
            (work / source.name).write_text(substitute(source.read_text(), values))
    args = [substitute(str(arg), values) for arg in case["args"]]
    watched = (work, *(path for path in models.values()))
    before = listing(*watched)
    returncode, stdout, stderr = cli.run(args, cwd=work)
    return Outcome(returncode, stdout, stderr, before, listing(*watched), args)


@pytest.fixture(scope="module")
def outcomes(models, evomerge_cli, tmp_path_factory) -> dict[str, Outcome]:
    """All cases, one after the other (each in its own process and scratch directory)."""
    root = tmp_path_factory.mktemp("bad_inputs")
    return {case["id"]: run_case(case, root / case["id"], models, evomerge_cli) for case in CASES}


def test_manifest_is_a_catalogue_of_distinct_cases() -> None:
    ids = [case["id"] for case in CASES]
    assert len(ids) >= 30 and len(set(ids)) == len(ids)
    assert all(set(case) == {"id", "args", "fragment"} for case in CASES)


@pytest.mark.parametrize("case", CASES, ids=[case["id"] for case in CASES])
def test_bad_input_exits_2_with_one_sentence_and_writes_nothing(case, outcomes, models) -> None:
    outcome = outcomes[case["id"]]
    fragment = substitute(case["fragment"], {"work": Path("@work@"), **models})
    assert "Traceback" not in outcome.stdout + outcome.stderr, outcome.stderr[-3000:]
    assert outcome.returncode == 2, (outcome.args, outcome.stderr[-2000:])
    lines = outcome.stderr.strip().splitlines()
    assert len(lines) == 1, outcome.stderr
    sentence = lines[0].removeprefix("error: ")
    assert fragment in sentence, sentence
    # One sentence: no full stop followed by a new capitalised sentence ("e.g." and paths are fine).
    assert re.search(r"\.\s+[A-Z]", sentence) is None, sentence
    changed = {p for p in {*outcome.before, *outcome.after} if outcome.before.get(p) != outcome.after.get(p)}
    assert not changed, changed
