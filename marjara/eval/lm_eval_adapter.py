"""The lm-evaluation-harness model "marjara": an exported model (or a checkpoint) as a TemplateLM.

    --model marjara --model_args pretrained=OUT_DIR[,dtype=bf16,ema=True,tag=global_step1000]

Importing this module registers the model with lm-eval; lm-eval's CLI cannot discover models from
other packages, which is why `python -m marjara.evaluate` exists.
"""

from __future__ import annotations

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from marjara.checkpoint.inference import load_for_inference
from marjara.dtypes import weight_dtype_names
from marjara.errors import MarjaraError
from marjara.eval.scoring import continuation_logprobs, in_batches

DTYPES = weight_dtype_names()
AUTO_BATCH_SIZE = 16


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


def _batch_size(value) -> int:
    if value is None or str(value).startswith("auto"):
        return AUTO_BATCH_SIZE
    size = int(value)
    if size < 1:
        raise MarjaraError(f"batch_size must be >= 1 (got {size})")
    return size


@register_model("marjara")
class MarjaraLM(TemplateLM):
    def __init__(self, pretrained: str, tag: str | None = None, ema=False, device: str | None = None,
                 dtype: str | None = None, batch_size=1, max_batch_size=None, max_gen_toks: int = 256,
                 **unused) -> None:
        super().__init__()
        if dtype is not None and str(dtype) not in DTYPES:
            raise MarjaraError(f"dtype={dtype} is not one of {', '.join(DTYPES)}")
        self.model, self.tok = load_for_inference(
            pretrained, tag=tag, ema=_flag(ema), device=device or "cpu", dtype=DTYPES.get(str(dtype)) if dtype else None)
        self._device = torch.device(device or "cpu")
        self.batch_size = _batch_size(batch_size)
        self.max_gen_toks = int(max_gen_toks)

    # ---- what TemplateLM needs -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.model.config.max_seq_len

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens) -> str:
        return self.tok.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        pairs = [(context, continuation) for _, context, continuation in requests]
        results = continuation_logprobs(self.model, pairs, self.max_length, self.batch_size)
        for (key, _, _), result in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Perplexity of whole texts: disjoint windows of the model's context, each scored once."""
        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="rolling loglikelihood"):
            (text,) = request.args
            windows = [
                make_disjoint_window(w)
                for w in get_rolling_token_windows(self.tok_encode(text), prefix_token=self.prefix_token_id,
                                                   max_seq_len=self.max_length, context_len=1)
            ]
            scores = continuation_logprobs(self.model, windows, self.max_length, self.batch_size)
            total = sum(score for score, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or sampled, with do_sample) continuations, cut at the first stop sequence; requests
        that share generation settings are generated as one batch with the KV cache."""
        results: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            groups.setdefault(repr(sorted(request.args[1].items())), []).append(i)
        for members in tqdm(groups.values(), disable=disable_tqdm, desc="generate_until"):
            kwargs = dict(requests[members[0]].args[1])
            until = kwargs.pop("until", None)
            until = handle_stop_sequences(list(until) if isinstance(until, list) else until,
                                          eos=self.tok_decode([self.eot_token_id]))
            max_new = max(1, min(int(kwargs.pop("max_gen_toks", self.max_gen_toks)), self.max_length - 1))
            temperature = float(kwargs.get("temperature", 0.0)) if _flag(kwargs.get("do_sample", False)) else 0.0
            prompts = [self.tok_encode(requests[i].args[0]) or [self.eot_token_id] for i in members]
            prompts = [p[-(self.max_length - max_new):] for p in prompts]
            for indices, batch in in_batches(prompts, self.batch_size, len):
                outputs = self.model.generate(batch, max_new, temperature=temperature, eos_token_id=self.eot_token_id)
                for local, tokens in zip(indices, outputs):
                    text = self.tok_decode(tokens)
                    for stop in until:
                        if stop and stop in text:
                            text = text[: text.index(stop)]
                    index = members[local]
                    results[index] = text
                    self.cache_hook.add_partial("generate_until", requests[index].args, text)
        return results  # type: ignore[return-value]
