"""The Model Service's one backend interface, its value types, and the registry that picks a backend per model.

A backend turns a batch of chat requests into generations: text, finish reason, token counts, and token ids
and logprobs when the engine gives them (RL trainers need them). Which backend serves a model name is
configuration (``MEGAFLOW_MODEL_CONFIG``), and adding a backend is adding ``modelserving/<name>_backend.py``
with a class decorated ``@register_backend("<name>")``.
"""

from __future__ import annotations

import abc
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path

from django.conf import settings

from megaflow_site.backend_registry import BackendRegistry

# The version a model serves before any is published: the weights its configuration names.
DEFAULT_VERSION = "base"


class ModelError(Exception):
    """A request could not be served; ``reason`` is what gets recorded on the episode."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class UnknownModel(ModelError):
    def __init__(self, name: str):
        super().__init__(f"unknown model {name!r}: MEGAFLOW_MODELS lists {', '.join(settings.MEGAFLOW_MODELS)}")
        self.name = name


class ContextLengthExceeded(ModelError):
    """The prompt does not fit the model's context window: the episode fails, nothing is retried."""


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    max_tokens: int = 512
    stop: tuple[str, ...] = ()
    seed: int | None = None
    logprobs: bool = False
    # How many alternatives to report at each position with its logprob (OpenAI's 0..20); needs ``logprobs``.
    top_logprobs: int = 0
    # vLLM's extension: the prompt's and the completion's token ids in the answer (backends with ids give them
    # anyway; the openai backend asks its server for them).
    return_token_ids: bool = False

    def as_dict(self) -> dict:
        return {**asdict(self), "stop": list(self.stop)}

    @classmethod
    def from_dict(cls, data: dict | None) -> SamplingParams:
        data = dict(data or {})
        data["stop"] = tuple(data.get("stop") or ())
        return cls(**{key: value for key, value in data.items() if key in cls.__dataclass_fields__})


@dataclass
class GenerationRequest:
    """One completion to make. ``context`` carries what non-neural backends need (replay: the task).
    ``prompt_token_ids``, when set, is the prompt exactly as the model must see it (token in, token out): a
    backend that takes ids generates from them instead of rendering ``messages``.

    ``tools`` (OpenAI's function tools) are rendered into the prompt by the chat template, and ``tool_choice``
    ("auto", "none", "required" or ``{"type": "function", "function": {"name": ...}}``) says which tool calls
    the reply may carry. A request without ``messages`` is a raw completion (``/v1/completions``): of
    ``prompt_token_ids`` when set, else of the text ``prompt``, with no chat template."""

    request_id: str
    messages: list[dict]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    context: dict = field(default_factory=dict)
    prompt_token_ids: list[int] | None = None
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    parallel_tool_calls: bool = True
    prompt: str | None = None

    @classmethod
    def from_dict(cls, data: dict) -> GenerationRequest:
        return cls(
            request_id=str(data["request_id"]),
            messages=list(data.get("messages") or []),
            sampling=SamplingParams.from_dict(data.get("sampling")),
            context=dict(data.get("context") or {}),
            prompt_token_ids=data.get("prompt_token_ids"),
            tools=data.get("tools"),
            tool_choice=data.get("tool_choice"),
            parallel_tool_calls=data.get("parallel_tool_calls", True),
            prompt=data.get("prompt"),
        )

    @property
    def is_raw_completion(self) -> bool:
        """A ``/v1/completions`` request: the prompt is taken as it is, no chat template."""
        return not self.messages

    def as_dict(self) -> dict:
        return {**asdict(self), "sampling": self.sampling.as_dict()}


@dataclass
class Generation:
    """The outcome of one request. ``error`` is set (and ``finish_reason`` is "error") when it failed.

    ``text`` is the reply's content; tool calls the model made are in ``tool_calls`` (OpenAI's shape: ``id``,
    ``type: "function"``, ``function: {name, arguments}`` with ``arguments`` a JSON string), taken out of the
    text, and ``finish_reason`` is then "tool_calls". Per completion token, when the backend has them:
    ``token_ids``, ``logprobs``, ``tokens`` (each token's text, by the backend's tokenizer) and
    ``top_logprobs`` (the most likely alternatives, ``[{"token", "token_id", "logprob"}]``)."""

    request_id: str
    text: str = ""
    finish_reason: str = "stop"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] | None = None
    logprobs: list[float] | None = None
    latency_s: float = 0.0
    error: str = ""
    model_version: str = ""
    tool_calls: list[dict] | None = None
    tokens: list[str] | None = None
    top_logprobs: list[list[dict]] | None = None
    prompt_token_ids: list[int] | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def infrastructure_failure(self) -> bool:
        """A server down past its retries (worth another attempt of the episode), not a prompt too long or a
        bad model name."""
        return self.error.startswith("model server")


class ModelBackend(abc.ABC):
    """Generation for one model name. Implementations must be safe to call from many threads at once.

    A backend with a tokenizer (``tokenizes``) renders chat messages to ids itself and generates from
    ``GenerationRequest.prompt_token_ids``, so an episode's prompts grow token in, token out
    (modelserving/token_prompts.py). ``version`` names the weights it serves; ``load_version`` swaps them
    between batches."""

    name: str = ""
    tokenizes: bool = False

    def __init__(self, model: str, **options):
        if options:
            raise ModelError(f"backend {self.name!r} of model {model!r} has no option(s) {', '.join(sorted(options))}")
        self.model = model
        self.version = DEFAULT_VERSION

    def chat_token_ids(
        self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None
    ) -> list[int]:
        """``messages`` (and ``tools``, OpenAI's function tools) rendered by the model's chat template, as ids
        (backends that ``tokenizes``)."""
        raise ModelError(f"backend {self.name!r} has no tokenizer")

    def text_token_ids(self, text: str) -> list[int]:
        """``text`` as ids, without special tokens (backends that ``tokenizes``)."""
        raise ModelError(f"backend {self.name!r} has no tokenizer")

    def load_version(self, version: str, checkpoint_path: str) -> None:
        """Serve the weights at ``checkpoint_path`` as ``version`` from the next batch on; a batch in flight
        finishes on the weights it started with. ``ModelError`` (and the old weights keep serving) when the
        checkpoint cannot be loaded."""
        raise ModelError(f"backend {self.name!r} of model {self.model!r} cannot load new weights")

    @abc.abstractmethod
    def generate(self, requests: list[GenerationRequest]) -> list[Generation]:
        """One generation per request, in order. A request that fails gets a Generation with ``error`` set;
        the batch as a whole raises ``ModelError`` only when nothing could be served."""

    def close(self) -> None:  # noqa: B027 - optional hook: most backends hold nothing to release
        """Release connections and subprocesses."""


_registry = BackendRegistry("modelserving", Path(__file__).parent)
register_backend = _registry.register
available_backends = _registry.names


def model_config(model: str) -> dict:
    """``{"backend": ..., **options}`` for a model name: its entry in ``MEGAFLOW_MODEL_CONFIG``, else the
    backend of the same name (``replay``, ``sim``), else ``openai`` at ``MEGAFLOW_MODEL_URL``."""
    if model not in settings.MEGAFLOW_MODELS:
        raise UnknownModel(model)
    if model in settings.MEGAFLOW_MODEL_CONFIG:
        return dict(settings.MEGAFLOW_MODEL_CONFIG[model])
    if model in available_backends():
        return {"backend": model}
    return {"backend": "openai", "base_url": settings.MEGAFLOW_MODEL_URL, "served_model": model}


_backends: dict[str, ModelBackend] = {}
_backends_lock = threading.Lock()


def get_backend(model: str) -> ModelBackend:
    """The process-wide backend serving ``model``, made once: a model worker's threads all ask at its first
    messages, and making it concurrently would load the weights once per thread (and race the first import of
    torch, which then fails in all but one)."""
    backend = _backends.get(model)
    if backend is not None:
        return backend
    with _backends_lock:
        if model not in _backends:
            config = model_config(model)
            name = config.pop("backend")
            kind = _registry.load(name)
            if kind is None:
                choices = ", ".join(available_backends())
                raise ModelError(f"model {model!r} names backend {name!r}; choose one of {choices}")
            _backends[model] = kind(model, **config)
        return _backends[model]
