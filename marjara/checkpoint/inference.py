"""Inference: a model loaded from an exported folder or straight from a training checkpoint, and
text generated from it (python -m marjara.generate's work)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import TextIO

import torch

from marjara.checkpoint.conversion import load_checkpoint_model
from marjara.checkpoint.format import LATEST
from marjara.checkpoint.locate import is_checkpoint_dir, is_tag_dir, open_checkpoint
from marjara.data.tokenizer import Tokenizer, get_tokenizer
from marjara.errors import MarjaraError
from marjara.model import MarjaraModel
from marjara.model.generation import check_fits, check_sampling_args
from marjara.model.pretrained import is_pretrained_dir, read_folder

SEPARATOR = "-" * 40  # between the outputs of a batch of prompts


def resolve_model_path(path: str | os.PathLike, tag: str | None = None, ema: bool = False
                       ) -> tuple[Path, str | None, bool]:
    """(folder, tag, is_checkpoint) for OUT_DIR (config.json), CKPT_DIR (latest) or CKPT_DIR/<tag>,
    checked cheaply (no weights read)."""
    path = Path(path)
    if is_pretrained_dir(path):
        if tag is not None or ema:
            raise MarjaraError(f"{path} is an exported model; --tag and --ema apply only to checkpoint folders")
        read_folder(path)
        return path, None, False
    if tag is None and not is_checkpoint_dir(path) and is_tag_dir(path) and path.is_dir():
        path, tag = path.parent, path.name
    if not path.is_dir() or not (is_checkpoint_dir(path) or tag is not None):
        raise MarjaraError(
            f"{path} is neither an exported model (no config.json) nor a checkpoint folder (no '{LATEST}'); "
            "pass the OUT_DIR of python -m marjara.convert or the --out_dir of a training run"
        )
    open_checkpoint(path, tag)
    return path, tag, True


def load_for_inference(path: str | os.PathLike, tag: str | None = None, ema: bool = False,
                       device: str | torch.device = "cpu", dtype: torch.dtype | None = None
                       ) -> tuple[torch.nn.Module, Tokenizer]:
    """(model in eval mode, built for inference: no process group needed, its tokenizer); a
    checkpoint is converted in memory. Whatever a library announces on stdout while the model
    loads goes to stderr, so that a command's own output (generated text) stays clean."""
    folder, tag, is_checkpoint = resolve_model_path(path, tag, ema)
    with contextlib.redirect_stdout(sys.stderr):
        if is_checkpoint:
            model, tokenizer_name = load_checkpoint_model(folder, tag=tag, ema=ema, device=device, dtype=dtype)
        else:
            tokenizer_name = read_folder(folder).tokenizer
            if tokenizer_name is None:
                raise MarjaraError(f"{folder} was not exported by MARJARA: its config.json names no MARJARA "
                                   "tokenizer; run it with transformers instead")
            model = MarjaraModel.from_pretrained(folder, device=device, dtype=dtype)
    return model, get_tokenizer(tokenizer_name)


def check_device(device: str) -> None:
    try:
        kind = torch.device(device).type
    except RuntimeError:
        raise MarjaraError(f"--device {device!r} is not a device name; use cpu, cuda or cuda:N") from None
    if kind == "cuda" and not torch.cuda.is_available():
        raise MarjaraError(f"--device {device}: this torch build sees no CUDA GPU; use --device cpu")


class TextStream:
    """Prints the text of a growing token sequence as it becomes final: characters still waiting
    for the rest of their bytes (decoded as U+FFFD for now) are held back."""

    def __init__(self, tokenizer: Tokenizer, out: TextIO) -> None:
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.printed = 0

    def push(self, token: int) -> None:
        self.ids.append(token)
        self._emit(self.tokenizer.decode(self.ids).rstrip("\ufffd"))

    def close(self) -> None:
        self._emit(self.tokenizer.decode(self.ids))

    def _emit(self, text: str) -> None:
        if len(text) > self.printed:
            self.out.write(text[self.printed:])
            self.out.flush()
            self.printed = len(text)


def read_prompts(prompt: str | None, prompt_file: str | None) -> list[str]:
    if (prompt is None) == (prompt_file is None):
        raise MarjaraError("give either --prompt TEXT or --prompt_file FILE (--prompt '' samples from scratch)")
    if prompt is not None:
        return [prompt]
    path = Path(prompt_file)
    if not path.is_file():
        raise MarjaraError(f"--prompt_file {path}: no such file")
    try:
        lines = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except UnicodeDecodeError:
        raise MarjaraError(f"--prompt_file {path} is not UTF-8 text") from None
    if not lines:
        raise MarjaraError(f"--prompt_file {path} holds no prompt (one per line, blank lines skipped)")
    return lines


def encode_prompt(tokenizer: Tokenizer, text: str) -> list[int]:
    """An empty prompt starts a new document: the end-of-text token that precedes every document."""
    return tokenizer.encode(text) or [tokenizer.eot_id]


def generate_text(model, tokenizer: Tokenizer, prompts: list[str], max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, seed: int | None, out: TextIO | None = None) -> list[list[int]]:
    """Generate and print (to stdout by default); returns the new tokens of each prompt."""
    out = out or sys.stdout
    encoded = [encode_prompt(tokenizer, p) for p in prompts]
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=tokenizer.eot_id, seed=seed)
    check_fits(model.config, max(len(e) for e in encoded), max_new_tokens)  # before anything is printed
    if len(prompts) == 1:
        out.write(prompts[0])
        stream = TextStream(tokenizer, out)

        def on_tokens(tokens):
            if tokens[0] is not None:
                stream.push(tokens[0])

        outputs = model.generate(encoded, max_new_tokens, on_tokens=on_tokens, **sampling)
        stream.close()
        out.write("\n")
    else:
        outputs = model.generate(encoded, max_new_tokens, **sampling)
        for prompt, tokens in zip(prompts, outputs):
            out.write(f"{prompt}{tokenizer.decode(tokens)}\n{SEPARATOR}\n")
    out.flush()
    return outputs


def generate_from(model_path: str | os.PathLike, prompt: str | None, prompt_file: str | None, max_new_tokens: int,
                  temperature: float, top_k: int | None, top_p: float | None, seed: int | None,
                  tag: str | None = None, ema: bool = False, device: str = "cpu", dtype: torch.dtype | None = None,
                  out: TextIO | None = None) -> list[list[int]]:
    """python -m marjara.generate: every flag checked before the model is loaded, then the prompts'
    continuations generated and printed; returns the new tokens of each prompt."""
    prompts = read_prompts(prompt, prompt_file)
    check_sampling_args(temperature, top_k, top_p, max_new_tokens)
    check_device(device)
    model, tokenizer = load_for_inference(model_path, tag=tag, ema=ema, device=device, dtype=dtype)
    return generate_text(model, tokenizer, prompts, max_new_tokens, temperature, top_k, top_p, seed, out)
