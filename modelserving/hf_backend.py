"""The ``hf`` backend: Hugging Face transformers ``generate``, batched, on CPU or GPU, for small models.

Options: ``model_path`` (a local directory: no hub downloads), ``device`` ("cpu", "cuda:0"), ``max_batch``
(default 16), ``context_length`` (default: the model's ``max_position_embeddings``), ``version`` (the name of
the weights at ``model_path``, default "base"). Requests whose sampling parameters match run as one padded
batch; one batch runs at a time per backend, and new weights (``load_version``) are swapped in between two
batches. A request's ``prompt_token_ids`` are generated from as given (token in, token out); completion ids
include the end-of-turn token when the model stopped on it. torch and transformers are imported only here, so
CPU-only workers never load them.
"""

from __future__ import annotations

import math
import threading
import time
from itertools import groupby

from modelserving.backend import (
    DEFAULT_VERSION,
    Generation,
    GenerationRequest,
    ModelBackend,
    ModelError,
    SamplingParams,
    register_backend,
)
from modelserving.tool_calls import template_messages, with_tool_calls


@register_backend("hf")
class HFBackend(ModelBackend):
    tokenizes = True

    def __init__(
        self,
        model: str,
        model_path: str,
        device: str = "cpu",
        max_batch: int = 16,
        context_length: int | None = None,
        version: str = DEFAULT_VERSION,
        **options,
    ):
        super().__init__(model, **options)
        self.version = str(version)
        try:
            import torch
            from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError:
            raise ModelError(
                "the hf backend needs torch and transformers (pip install -r requirements-model.txt)"
            ) from None
        self.torch = torch
        self.model_class = AutoModelForCausalLM
        self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.engine = AutoModelForCausalLM.from_pretrained(model_path).to(device).eval()
        self.device = device
        self.max_batch = int(max_batch)
        self.context_length = int(context_length or self.engine.config.max_position_embeddings)
        self._lock = threading.Lock()

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        if request.prompt_token_ids is not None:
            return list(request.prompt_token_ids)
        if request.is_raw_completion:
            return list(self.tokenizer.encode(request.prompt or ""))  # special tokens added, as vLLM does
        return self.chat_token_ids(request.messages, tools=request.tools)

    def chat_token_ids(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        return list(
            self.tokenizer.apply_chat_template(
                template_messages(messages),
                tools=tools or None,
                add_generation_prompt=add_generation_prompt,
                tokenize=True,
                return_dict=False,
            )
        )

    def text_token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def load_version(self, version: str, checkpoint_path: str) -> None:
        # Loaded outside the lock: the batch in flight runs on the old weights meanwhile.
        try:
            engine = self.model_class.from_pretrained(checkpoint_path).to(self.device).eval()
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load weights from {checkpoint_path!r}: {exc}") from None
        if engine.config.vocab_size != self.engine.config.vocab_size:
            raise ModelError(
                f"{checkpoint_path!r} has a vocabulary of {engine.config.vocab_size}, the served tokenizer "
                f"{self.engine.config.vocab_size}: token ids would not carry over"
            )
        with self._lock:
            self.engine, self.version = engine, str(version)

    def check_length(self, request: GenerationRequest, prompt_tokens: int) -> str:
        """The context-length error for a request, or ''. The wording follows vLLM's, which clients match on."""
        wanted = prompt_tokens + request.sampling.max_tokens
        if wanted <= self.context_length:
            return ""
        return (
            f"This model's maximum context length is {self.context_length} tokens. However, you requested {wanted} "
            f"tokens ({prompt_tokens} in the messages, {request.sampling.max_tokens} in the completion)."
        )

    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        results: dict[str, Generation] = {}
        runnable = []
        for request in requests:
            ids = self.prompt_ids(request)
            if error := self.check_length(request, len(ids)):
                results[request.request_id] = Generation(
                    request.request_id, finish_reason="error", prompt_tokens=len(ids), error=error
                )
            else:
                runnable.append((request, ids))
        by_params = sorted(runnable, key=lambda item: batch_key(item[0].sampling))
        for _, group in groupby(by_params, key=lambda item: batch_key(item[0].sampling)):
            group = list(group)
            for start in range(0, len(group), self.max_batch):
                for generation in self._generate_batch(group[start : start + self.max_batch]):
                    results[generation.request_id] = generation
        return [results[request.request_id] for request in requests]

    def _generate_batch(self, batch: list[tuple[GenerationRequest, list[int]]]) -> list[Generation]:
        torch, tokenizer = self.torch, self.tokenizer
        sampling = max((request.sampling for request, _ in batch), key=lambda params: params.top_logprobs)
        started = time.monotonic()
        width = max(len(ids) for _, ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, (_, ids) in enumerate(batch):
            input_ids[row, width - len(ids) :] = torch.tensor(ids)
            attention[row, width - len(ids) :] = 1
        if batch[0][0].sampling.seed is not None:
            torch.manual_seed(batch[0][0].sampling.seed)
        with self._lock, torch.no_grad():
            version = self.version
            output = self.engine.generate(
                input_ids=input_ids.to(self.device),
                attention_mask=attention.to(self.device),
                max_new_tokens=sampling.max_tokens,
                do_sample=sampling.temperature > 0,
                temperature=sampling.temperature if sampling.temperature > 0 else None,
                top_p=sampling.top_p if sampling.temperature > 0 else None,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                return_dict_in_generate=True,
                output_scores=sampling.logprobs,
            )
            scores = top = None
            if sampling.logprobs:
                # The distribution each token was sampled from (the processed scores), per position.
                steps = torch.stack(output.scores, dim=1).log_softmax(dim=-1)
                scores = steps.gather(-1, output.sequences[:, width:, None]).squeeze(-1)
                if sampling.top_logprobs:
                    top = steps.topk(sampling.top_logprobs, dim=-1)
        latency = time.monotonic() - started
        generations = []
        for row, (request, ids) in enumerate(batch):
            new = output.sequences[row, width:].tolist()
            finish = "length"
            if tokenizer.eos_token_id in new:  # kept: the model sampled it, and a trainer trains on it
                new, finish = new[: new.index(tokenizer.eos_token_id) + 1], "stop"
            text = tokenizer.decode(new, skip_special_tokens=True)
            for stop in request.sampling.stop:
                if stop in text:
                    text, finish = text[: text.index(stop)], "stop"
            generation = Generation(
                request_id=request.request_id,
                text=text,
                finish_reason=finish,
                prompt_tokens=len(ids),
                completion_tokens=len(new),
                token_ids=new,
                latency_s=latency,
                model_version=version,
                prompt_token_ids=ids if request.sampling.return_token_ids else None,
            )
            if request.sampling.logprobs:
                generation.logprobs = scores[row, : len(new)].tolist()
                generation.tokens = [tokenizer.decode([token]) for token in new]
            if request.sampling.top_logprobs:
                indices = top.indices[row, : len(new), : request.sampling.top_logprobs].tolist()
                values = top.values[row, : len(new), : request.sampling.top_logprobs].tolist()
                generation.top_logprobs = [self._alternatives(*step) for step in zip(indices, values, strict=True)]
            generations.append(with_tool_calls(generation, request))
        return generations

    def _alternatives(self, token_ids: list[int], logprobs: list[float]) -> list[dict]:
        """One position's most likely tokens; those the sampler had ruled out (top_p) have no finite logprob
        and are left out."""
        return [
            {"token": self.tokenizer.decode([token]), "token_id": token, "logprob": logprob}
            for token, logprob in zip(token_ids, logprobs, strict=True)
            if math.isfinite(logprob)
        ]


def batch_key(sampling: SamplingParams) -> tuple:
    """Requests that can share one ``generate`` call: the same sampling, up to the seed (a seeded batch draws
    from one generator, seeded by its first request's seed, so the ``n`` samples of one request, seeded
    ``seed + i``, run together) and to how many top logprobs each wants (the batch computes the most)."""
    return (
        sampling.temperature,
        sampling.top_p,
        sampling.max_tokens,
        sampling.logprobs,
        sampling.seed is not None,
    )
