"""An offline byte-level tokenizer with the Qwen chat template.

The real Z-Image text encoder is Qwen3-4B with the Qwen2 BPE tokenizer (151k tokens). Toy models
cannot download it, so they use a byte-level BPE whose vocabulary is the 256 byte symbols plus Qwen's
special tokens and no merges: it encodes any UTF-8 prompt (one token per byte) through the very same
``Qwen2Tokenizer`` class and chat-template path that ``ZImagePipeline`` uses.
"""

from __future__ import annotations

from tokenizers import AddedToken
from tokenizers.pre_tokenizers import ByteLevel
from transformers import Qwen2Tokenizer

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Qwen3's template reduced to what the pipeline renders: one user turn plus the generation prompt.
# ``enable_thinking=False`` inserts an empty think block, exactly like the upstream template.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}"
    "{% endif %}"
)


def build_byte_tokenizer() -> Qwen2Tokenizer:
    """Build the offline tokenizer; its vocabulary size is 256 + len(SPECIAL_TOKENS)."""
    vocab = {symbol: index for index, symbol in enumerate(sorted(ByteLevel.alphabet()))}
    for token in SPECIAL_TOKENS:
        vocab[token] = len(vocab)
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.add_tokens(
        [AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS],
        special_tokens=True,
    )
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer
