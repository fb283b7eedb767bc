"""Greedy-decoding throughput: our Evaluator vs HF `generate` per example vs HF `generate` batched.

All three decode the same random-token prompts on the same random Llama; the script checks that the
greedy outputs are token-for-token identical and prints examples/s, generated tokens/s and ratios.

    python benchmarks/eval_speed.py                         # CPU, small model (the RESULTS.md figures)
    python benchmarks/eval_speed.py --device cuda --size 1b # ~1.1B Llama in bf16, 64 x 64 tokens, 64 new
    python benchmarks/eval_speed.py --stop a --stop e       # rows end at different steps (stop strings)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import string
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from evomerge.evaluate import Evaluator, default_dtype, load_task, truncate_at_stop
from evomerge.zoo.tokenizer import build_char_tokenizer

# (hidden, layers, intermediate, heads, kv heads, vocab): "1b" is TinyLlama-1.1B's shape.
SIZES = {
    "tiny": (64, 4, 128, 4, 2, None),
    "small": (256, 6, 688, 8, 4, None),
    "1b": (2048, 22, 5632, 32, 4, 32000),
}
CHARACTERS = string.ascii_letters + string.digits


def build_model(size: str, tokenizer, device: str, dtype: torch.dtype) -> LlamaForCausalLM:
    """A random Llama of the given size whose greedy decoding never emits a special token."""
    hidden, layers, inter, heads, kv, vocab = SIZES[size]
    config = LlamaConfig(
        vocab_size=vocab or len(tokenizer),
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv,
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    with torch.no_grad():
        # Zero logit for every special token: with a random head some character always wins, so runs
        # without stop strings decode exactly --new-tokens tokens, and no "<unk>" ever reaches HF's
        # stop-string matcher (it matches token strings, while we match decoded text).
        model.lm_head.weight[tokenizer.all_special_ids] = 0
    return model


def write_task(directory: Path, prompts: int, prompt_tokens: int, new_tokens: int, stop: list[str]) -> Path:
    """A task of random character strings (one token per character with the char tokenizer)."""
    rng = random.Random(0)
    rows = [
        {"q": "".join(rng.choice(CHARACTERS) for _ in range(prompt_tokens)), "a": str(i)}
        for i in range(prompts + 1)
    ]
    (directory / "search.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:prompts]))
    (directory / "test.jsonl").write_text(json.dumps(rows[-1]) + "\n")
    path = directory / "speed.yaml"
    path.write_text(
        "name: speed\ndata: {search: search.jsonl, test: test.jsonl}\nprompt: '{q}'\nanswer_field: a\n"
        f"scorer: exact\ngeneration: {{max_new_tokens: {new_tokens}, stop: {json.dumps(stop)}}}\n"
    )
    return path


def timed(fn: Callable[[], list[list[int]]], device: str) -> tuple[list[list[int]], float]:
    """Run `fn` once after a synchronised start and end; return its outputs and wall seconds."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--size", choices=sorted(SIZES), default="small")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = build_char_tokenizer(CHARACTERS)
    dtype = default_dtype(args.device)
    model = build_model(args.size, tokenizer, args.device, dtype)
    with tempfile.TemporaryDirectory() as tmp:
        task = load_task(write_task(Path(tmp), args.prompts, args.prompt_tokens, args.new_tokens, args.stop))
    evaluator = Evaluator(tokenizer, [task], device=args.device, batch_size=args.batch_size, dtype=dtype)
    prompts = task.prompts("search")
    indices = list(range(len(prompts)))
    gen_kwargs = {
        "do_sample": False,
        "max_new_tokens": args.new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
        **({"stop_strings": args.stop, "tokenizer": tokenizer} if args.stop else {}),
    }

    def text(ids: list[int]) -> str:
        """What gets scored: the decoded generation cut at the first stop string."""
        return truncate_at_stop(tokenizer.decode(ids, skip_special_tokens=True), args.stop)

    def ours() -> list[list[int]]:
        produced = evaluator.generate(model, "speed", indices)
        return [produced[i].ids for i in indices]

    @torch.inference_mode()
    def hf_loop() -> list[list[int]]:
        outs = []
        for prompt in prompts:
            ids = tokenizer(prompt, return_tensors="pt").to(args.device)
            outs.append(model.generate(**ids, **gen_kwargs)[0, ids["input_ids"].shape[1] :].tolist())
        return outs

    @torch.inference_mode()
    def hf_batched() -> list[list[int]]:
        outs = []
        for start in range(0, len(prompts), args.batch_size):
            chunk = prompts[start : start + args.batch_size]
            ids = tokenizer(chunk, return_tensors="pt", padding=True).to(args.device)
            out = model.generate(**ids, **gen_kwargs)[:, ids["input_ids"].shape[1] :]
            outs.extend(out.tolist())
        return outs

    # Warm-up (kernels, allocator, lazy imports) on a couple of prompts per method.
    evaluator.generate(model, "speed", indices[:2])
    model.generate(**tokenizer(prompts[:2], return_tensors="pt", padding=True).to(args.device), **gen_kwargs)

    reference, ours_s = timed(ours, args.device)
    # Useful tokens: up to the stop (or the limit), the same for every method when outputs agree.
    tokens = sum(len(ids) for ids in reference)
    rows = [("evomerge Evaluator", ours_s, reference)]
    for name, fn in (("HF generate, batched", hf_batched), ("HF generate, per example", hf_loop)):
        out, seconds = timed(fn, args.device)
        rows.append((name, seconds, out))
    expected = [text(ids) for ids in reference]

    params = sum(p.numel() for p in model.parameters())
    print(
        f"device={args.device} ({torch.cuda.get_device_name() if args.device.startswith('cuda') else platform.processor() or platform.machine()}), "
        f"threads={torch.get_num_threads()}, load={os.getloadavg()[0]:.1f}, size={args.size} ({params / 1e6:.1f}M params, {dtype}), "
        f"{args.prompts} prompts x {args.prompt_tokens} tokens, {args.new_tokens} new tokens, batch {args.batch_size}, "
        f"stop={args.stop}, {tokens / len(reference):.1f} tokens generated per example"
    )
    print(
        f"{'method':<26} {'seconds':>8} {'examples/s':>11} {'gen tok/s':>10} {'ours is x faster':>17} {'identical':>10}"
    )
    for name, seconds, out in rows:
        print(
            f"{name:<26} {seconds:>8.2f} {len(out) / seconds:>11.2f} {tokens / seconds:>10.1f} "
            f"{seconds / ours_s:>17.2f} {[text(ids) for ids in out] == expected!s:>10}"
        )


if __name__ == "__main__":
    main()
