"""Tiny random models with offline tokenizers, for fast tests.

`tiny_bert(dir)` and `tiny_llama(dir)` write a folder that `AutoModel*` / `AutoTokenizer`
load with `from_pretrained`, and return its path. Nothing is downloaded: the BERT vocabulary is
the words of the small corpus below plus single characters, and the Llama BPE is trained on it
(both are the same in every process). Hidden sizes are 64 so that
bitsandbytes 4-bit layers (blocksize 64) quantise them.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    BertConfig,
    BertModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

CORPUS: list[str] = [
    "the movie was great and the acting was wonderful",
    "a terrible film with a boring plot and bad acting",
    "i loved every minute of this charming story",
    "the worst movie i have seen this year",
    "an excellent cast makes this a joy to watch",
    "dull , slow and far too long",
    "stocks rose today as markets rallied on strong earnings",
    "the team won the championship game last night",
    "scientists discovered a new species of frog in the rainforest",
    "the president met world leaders to discuss trade",
    "write a short poem about the sea",
    "give three tips for staying healthy",
    "translate the sentence into french please",
    "what is the capital of france ? the capital is paris",
    "explain why the sky is blue in simple words",
    "sort the list of numbers from small to large",
]

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def tiny_bert(directory: str | Path, hidden_size: int = 64, seed: int = 0) -> str:
    """A BERT-like encoder (2 layers, 2 heads, pooler) with a WordPiece tokenizer."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    # The vocabulary is written out, not trained: WordPieceTrainer breaks ties in hash order, so
    # every process would get other ids, hence another model trajectory and other test results.
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = {
        word
        for line in CORPUS
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    }
    alphabet = sorted(set(string.ascii_lowercase + string.digits + string.punctuation))
    vocab = specials + sorted(words) + alphabet + ["##" + c for c in alphabet]
    tok = Tokenizer(
        models.WordPiece({t: i for i, t in enumerate(dict.fromkeys(vocab))}, unk_token="[UNK]")
    )
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )
    fast.save_pretrained(out)
    config = BertConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=2 * hidden_size,
        max_position_embeddings=128,
        pad_token_id=tok.token_to_id("[PAD]"),
    )
    torch.manual_seed(seed)
    # BertModel (with its pooler) so that every load gives the same weights: nothing is MISSING.
    BertModel(config, add_pooling_layer=True).save_pretrained(out, safe_serialization=True)
    return str(out)


def tiny_llama(directory: str | Path, hidden_size: int = 64, seed: int = 0) -> str:
    """A Llama-like causal LM (2 layers, 2 heads) with a byte-level BPE tokenizer and chat template."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        CORPUS,
        trainers.BpeTrainer(
            vocab_size=400,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(out)
    config = LlamaConfig(
        vocab_size=tok.get_vocab_size(),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=256,
        bos_token_id=tok.token_to_id("<|im_start|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"),
        pad_token_id=tok.token_to_id("<|endoftext|>"),
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(out, safe_serialization=True)
    return str(out)


def run_cli(argv: list[str]) -> int:
    """`lorafit ARGV` in this process; its exit code (argparse and user errors exit too)."""
    import pytest

    from lorafit import cli

    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    return exit_info.value.code
