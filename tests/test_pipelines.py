"""``polymodal.pipeline(task, model)``: each task's output equals what its command prints/returns
on the same inputs (issue 14, "what users of the ecosystem expect" 2), on tiny random models."""
from __future__ import annotations

import io
import string

import pytest
import torch

import polymodal
from polymodal.models.registry import build_model, save_model
from test_serve import CHAT_TEMPLATE, _tiny_gpt_folder


def _tiny_clip_folder(root):
    from polymodal.models.clip import CLIPConfig
    from polymodal.tokenizers import train_char_tokenizer

    tok = train_char_tokenizer(string.ascii_lowercase + " .", special_tokens=["<pad>", "<bos>", "<eos>"])
    tok = type(tok).from_tokenizers(tok.backend, pad="<pad>", bos="<bos>", eos="<eos>")
    torch.manual_seed(0)
    cfg = CLIPConfig.from_preset("clip-nano")
    cfg.text.vocab_size, cfg.text.eos_token_id, cfg.text.pad_token_id = tok.vocab_size, tok.eos_id, tok.pad_id
    return save_model(build_model(cfg).eval(), root / "clip", tokenizer=tok)


def _tiny_vlm_folder(root):
    from polymodal.models.vlm import VLM, VLMConfig, _nano_decoder
    from polymodal.tokenizers import train_char_tokenizer

    tok = train_char_tokenizer(string.ascii_letters + string.digits + " \n")  # 65 ids below the placeholder
    tok = type(tok).from_tokenizers(tok.backend, chat_template=CHAT_TEMPLATE)
    torch.manual_seed(0)
    return save_model(VLM(VLMConfig(decoder=_nano_decoder(init_std=0.5))).eval(), root / "vlm", tokenizer=tok)


def _images(root, n=3):
    from PIL import Image

    d = root / "images"
    d.mkdir(exist_ok=True)
    paths = []
    for i, c in enumerate([(250, 20, 20), (20, 250, 20), (20, 20, 250)][:n]):
        Image.new("RGB", (40, 40), c).save(d / f"im{i}.png")
        paths.append(d / f"im{i}.png")
    return paths


def test_unknown_task_and_missing_model():
    with pytest.raises(ValueError, match="unknown pipeline task 'translate-everything'.*text-generation"):
        polymodal.pipeline("translate-everything")
    with pytest.raises(ValueError, match="needs model="):
        polymodal.pipeline("image-to-text")


def test_text_generation_equals_generate_command(tmp_path):
    from polymodal.commands.generate import generate_cmd

    folder = _tiny_gpt_folder(tmp_path)
    pipe = polymodal.pipeline("text-generation", model=str(folder), max_new_tokens=10, temperature=0.0)
    out = pipe("hello there", return_full_text=False)[0]["generated_text"]
    ref = generate_cmd("hello there", model=str(folder), max_new_tokens=10, temperature=0.0, stream=False,
                       device="cpu")
    assert out == ref and out
    assert pipe("hello there")[0]["generated_text"] == "hello there" + ref
    assert [o[0]["generated_text"] for o in pipe(["a", "b"], return_full_text=False)] == \
        [pipe(p, return_full_text=False)[0]["generated_text"] for p in ("a", "b")]


def test_chat_equals_chat_command(tmp_path, monkeypatch):
    from polymodal.commands.chat import chat_cmd

    folder = _tiny_gpt_folder(tmp_path)
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n/exit\n"))
    history = chat_cmd(model=str(folder), temperature=0.0, max_new_tokens=8, device="cpu")
    pipe = polymodal.pipeline("chat", model=str(folder), temperature=0.0, max_new_tokens=8)
    out = pipe("hello")[0]["generated_text"]
    assert out[-1] == {"role": "assistant", "content": history[-1]["content"]} and out[0]["content"] == "hello"


def test_feature_extraction_equals_served_embeddings(tmp_path):
    pytest.importorskip("fastapi")
    import httpx

    from polymodal.models.encoder import EncoderConfig
    from polymodal.serve.app import create_app
    from polymodal.serve.models import ServedModel
    from polymodal.serve.server import ServerThread
    from polymodal.tokenizers import train_char_tokenizer

    tok = train_char_tokenizer(string.ascii_lowercase + " ")
    torch.manual_seed(0)
    folder = save_model(build_model(EncoderConfig.from_preset("tiny-bert", vocab_size=tok.vocab_size)),
                        tmp_path / "enc", tokenizer=tok)
    texts = ["a cat", "the quick brown fox"]
    got = polymodal.pipeline("feature-extraction", model=str(folder))(texts)
    with ServerThread(create_app([ServedModel.load(f"enc={folder}")])) as srv:
        r = httpx.post(srv.url + "/v1/embeddings", json={"model": "enc", "input": texts}).json()
    torch.testing.assert_close(got, torch.tensor([d["embedding"] for d in r["data"]]), rtol=1e-5, atol=1e-6)
    clip = polymodal.pipeline("feature-extraction", model=str(_tiny_clip_folder(tmp_path)))(texts)
    assert clip.shape == (2, 64)


def test_zero_shot_equals_zero_shot_command(tmp_path):
    from polymodal.commands.clip import zero_shot

    folder = _tiny_clip_folder(tmp_path)
    paths = _images(tmp_path)
    labels = ["red", "green", "blue"]
    ref = zero_shot(str(folder), images=str(paths[0].parent), classes=labels, templates=["a photo of {}."])
    pipe = polymodal.pipeline("zero-shot-image-classification", model=str(folder))
    out = pipe([str(p) for p in paths], candidate_labels=labels, templates=["a photo of {}."])
    by_image = {r["image"]: r for r in ref["predictions"]}
    for p, ranked in zip(paths, out):
        assert ranked[0]["label"] == by_image[str(p)]["pred"]
        assert abs(ranked[0]["score"] - by_image[str(p)]["prob"]) < 1e-4
        assert abs(sum(r["score"] for r in ranked) - 1) < 1e-5
    one = pipe(str(paths[0]), candidate_labels=labels, templates=["a photo of {}."])  # one image, not a list
    assert [r["label"] for r in one] == [r["label"] for r in out[0]]
    assert all(abs(a["score"] - b["score"]) < 1e-5 for a, b in zip(one, out[0]))


def test_image_to_text_and_vqa_equal_their_commands(tmp_path):
    from polymodal.commands.vlm import caption
    from polymodal.commands.vqa import vqa

    folder = _tiny_vlm_folder(tmp_path)
    paths = [str(p) for p in _images(tmp_path, 2)]
    rows = caption(str(folder), paths, beam=1, max_new_tokens=6)
    cap = polymodal.pipeline("image-to-text", model=str(folder), beam=1, max_new_tokens=6)
    assert [o[0]["generated_text"] for o in cap(paths)] == [r["caption"] for r in rows]
    ans = vqa(str(folder), paths[0], "what color", max_new_tokens=5)
    out = polymodal.pipeline("visual-question-answering", model=str(folder))(paths[0], "what color", max_new_tokens=5)
    assert out[0]["answer"] == ans["answer"]


def test_sentence_encoder_equals_sentence_transformers():
    """``polymodal.sentence_encoder("minilm").encode`` == sentence-transformers on the same weights."""
    import polymodal

    st = pytest.importorskip("sentence_transformers")
    from polymodal.interop import resolve_model_path

    sents = ["A dog runs on the grass.", "Two men are playing chess."]
    ours = polymodal.sentence_encoder("minilm").encode(sents)
    ref = st.SentenceTransformer(str(resolve_model_path("minilm")), device="cpu").encode(sents, convert_to_tensor=True)
    torch.testing.assert_close(ours.float(), ref.float(), atol=1e-5, rtol=1e-4)


def test_create_model_and_transforms_equals_the_embedding_helpers(tmp_path):
    from PIL import Image

    from polymodal.models.dual_encoder import encode_images, encode_texts, load_dual_encoder

    tiny_clip_dir = _tiny_clip_folder(tmp_path)
    model, preprocess, tokenize = polymodal.create_model_and_transforms(tiny_clip_dir)
    ids, mask = tokenize(["a dog", "a red bus"])
    img = Image.new("RGB", (40, 30), (200, 30, 30))
    with torch.no_grad():
        t = model.encode_text(ids, mask, normalize=True)
        i = model.encode_image(preprocess([img]), normalize=True)
    m2, tok2, proc2 = load_dual_encoder(tiny_clip_dir)
    torch.testing.assert_close(t, encode_texts(m2, tok2, ["a dog", "a red bus"]))
    torch.testing.assert_close(i, encode_images(m2, proc2, [img]))
