"""Tokenizers: char-level and byte-level BPE training, Hugging Face folder loading, chat
templates and streaming detokenisation, all backed by the ``tokenizers`` library."""
from .base import StreamDecoder, Tokenizer
from .chat import render_chat_template
from .train import read_text_file, train_bpe_tokenizer, train_char_tokenizer

__all__ = ["Tokenizer", "StreamDecoder", "train_char_tokenizer", "train_bpe_tokenizer", "render_chat_template",
           "read_text_file"]
