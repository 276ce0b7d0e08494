"""Build a tiny causal language model locally: random weights, a BPE tokenizer trained on a few KB of text.

No weights can be downloaded here, yet the HTTP path of the Model Service must be tested against a real model
running in a real server. This makes one in seconds: a 2-layer Llama (hidden size 64) whose tokenizer is
trained on MegaFlow's own task-suite sources, with a chat template. Its replies are gibberish; its batching,
token counts, context limit and logprobs are real.

    python -m tests.support.tiny_model var/tiny-model
"""

from __future__ import annotations

import sys
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[2] / "envs" / "suites" / "swe_mini" / "projects"
# An agent config that fits the tiny model's 256-token context: short prompts, and only the last turn kept.
TINY_AGENT_CONFIG = {
    "system_template": "Reply with bash.",
    "instance_template": "Fix $instance_id.",
    "format_error_template": "Bad reply: $problem",
    "max_history_turns": 1,
    "sampling": {"max_tokens": 8},
}
# The Hermes convention (Qwen, Hermes): declared tools in a system turn, a call as a <tool_call> JSON block, a
# tool's answer in <tool_response>. A conversation without tools renders as "<s>role\ncontent</s>\n" turns.
CHAT_TEMPLATE = (
    "{% if tools %}<s>system\n<tools>\n{% for tool in tools %}{{ tool | tojson }}\n{% endfor %}"
    "</tools></s>\n{% endif %}"
    "{% for message in messages %}<s>{{ message['role'] }}\n"
    "{% if message['role'] == 'tool' %}<tool_response>\n{{ message['content'] }}\n</tool_response>"
    "{% else %}{{ message['content'] or '' }}{% endif %}"
    "{% for call in message['tool_calls'] or [] %}<tool_call>\n"
    "{{ {'name': call['function']['name'], 'arguments': call['function']['arguments']} | tojson }}\n</tool_call>"
    "{% endfor %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tiny_model(path: Path, context_length: int = 256, vocab_size: int = 512, seed: int = 0) -> Path:
    """Write a tokenizer and a randomly initialised model to ``path`` (skipped when already there; a model
    built before the chat template changed gets the current one)."""
    if (path / "config.json").exists() and (path / "tokenizer.json").exists():
        template = path / "chat_template.jinja"
        if not template.exists() or template.read_text() != CHAT_TEMPLATE:
            template.write_text(CHAT_TEMPLATE)
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    text = "".join(source.read_text() for source in sorted(CORPUS.rglob("*.py")))
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([text], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )
    fast.chat_template = CHAT_TEMPLATE
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=context_length,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
    )
    path.mkdir(parents=True, exist_ok=True)
    LlamaForCausalLM(config).eval().save_pretrained(path)
    fast.save_pretrained(path)
    return path


if __name__ == "__main__":
    print(build_tiny_model(Path(sys.argv[1] if len(sys.argv) > 1 else "var/tiny-model")))
