"""Regression tests for the serving / loading defects of issue 14 (one test per defect).

Each test names its defect. The server is driven over HTTP (httpx, the ``openai`` client)
through ``ServerThread``; models are tiny random ones built here and saved as polymodal folders.
"""
from __future__ import annotations

import json
import socket
import string
import struct
import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import polymodal  # noqa: E402
from polymodal.io import CheckpointError  # noqa: E402
from polymodal.models.registry import build_model, save_model  # noqa: E402
from polymodal.serve.app import create_app  # noqa: E402
from polymodal.serve.models import ServedModel  # noqa: E402
from polymodal.serve.server import ServerThread  # noqa: E402
from test_serve import CONTEXT, _png, _tiny_gpt_folder  # noqa: E402


def _tiny_minilm_clip_folder(root):
    """A CLIP whose text tower is a BERT-style Encoder (``encoder_tower``: what train-clip's
    default MiniLM text tower saves), with a WordPiece-like tokenizer carrying [CLS]/[SEP]/[PAD]."""
    from polymodal.models.clip import CLIPConfig
    from polymodal.tokenizers import train_char_tokenizer

    tok = train_char_tokenizer(string.ascii_lowercase + " ", special_tokens=["[PAD]", "[CLS]", "[SEP]"])
    tok = type(tok).from_tokenizers(tok.backend, pad="[PAD]", cls="[CLS]", sep="[SEP]")
    vision = CLIPConfig.from_preset("clip-nano").vision.to_dict()
    enc = dict(family="encoder", vocab_size=tok.vocab_size, block_size=32, n_layer=1, n_head=2, n_embd=32,
               intermediate_size=64, dropout=0.0, pooler=False, pad_token_id=tok.pad_id)
    torch.manual_seed(0)
    cfg = CLIPConfig(name="vit+minilm", vision=vision, text=dict(family="encoder_tower", encoder=enc),
                     projection_dim=16)
    return save_model(build_model(cfg).eval(), root / "clip", tokenizer=tok)


def _image_dir(root, n=3):
    from PIL import Image

    d = root / "images"
    d.mkdir()
    for i in range(n):
        Image.new("RGB", (40, 40), (60 * i, 200 - 50 * i, 30)).save(d / f"img{i}.png")
    return d


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    gpt = ServedModel.load(f"tiny={_tiny_gpt_folder(root)}", context=CONTEXT)
    clip = ServedModel.load(f"clip={_tiny_minilm_clip_folder(root)}")
    images = _image_dir(root)
    (images / "broken.jpg").write_bytes(b"this is not a JPEG")  # defect 2: one unreadable file
    app = create_app([gpt, clip], image_dir=str(images), cors_origins=["http://allowed.example"])
    with ServerThread(app) as s:
        yield s


def _chat_body(**kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, **kw}


def _err(resp, status, code=None):
    assert resp.status_code == status, resp.text
    e = resp.json()["error"]
    assert set(e) == {"message", "type", "param", "code"} and e["message"]
    if code is not None:
        assert e["code"] == code, e
    return e


# -- defect 1: a served CLIP with a MiniLM-style text tower embeds text ---------------------------------

def test_d1_clip_with_encoder_text_tower_embeds_text(srv):
    r = httpx.post(srv.url + "/v1/embeddings", json={"model": "clip", "input": "a dog"})
    assert r.status_code == 200, r.text
    e = torch.tensor(r.json()["data"][0]["embedding"])
    assert e.shape == (16,) and abs(float(e.norm()) - 1) < 1e-5
    sm = srv.server.config.app.state.models["clip"]
    ids = sm.tokenizer.encode("a dog", add_special_tokens=True)
    with torch.no_grad():
        ref = sm.model.encode_text(torch.tensor([ids]), torch.ones(1, len(ids), dtype=torch.long), normalize=True)[0]
    torch.testing.assert_close(e, ref, rtol=1e-5, atol=1e-6)
    # padded in a batch = alone (the tower's pad id and mask are used)
    b = httpx.post(srv.url + "/v1/embeddings", json={"model": "clip", "input": ["a dog", "a much longer caption"]})
    torch.testing.assert_close(torch.tensor(b.json()["data"][0]["embedding"]), e, rtol=1e-5, atol=1e-6)


# -- defect 2: one unreadable image does not fail the playground search --------------------------------

def test_d2_search_skips_unreadable_images(srv):
    r = httpx.post(srv.url + "/playground/search", json={"model": "clip", "query": "a red square", "top_k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert sorted(x["file"] for x in body["results"]) == ["img0.png", "img1.png", "img2.png"]
    assert body["skipped"] == 1 and "broken.jpg" in body["skipped_files"][0]


# -- defect 3: a crafted GGUF header is refused at once ---------------------------------------------------

def test_d3_crafted_gguf_array_count_is_refused_quickly(tmp_path):
    """The issue's 61-byte file: an array claiming 2**60 elements. The loader must refuse it
    (naming the file and the field) without allocating: the check runs in a child process
    capped at 3 GB of address space and 60 s."""
    path = tmp_path / "x.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 4) + b"test"
                     + struct.pack("<II", 9, 4) + struct.pack("<Q", 2 ** 60) + b"\0" * 16)
    code = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
        import polymodal
        from polymodal.io import CheckpointError
        try:
            polymodal.load({str(path)!r})
        except CheckpointError as e:
            print("REFUSED", e)
    """)
    try:
        r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                           env={"OMP_NUM_THREADS": "1", "POLYMODAL_CACHE": str(tmp_path / "cache"),
                                "PATH": "/usr/bin:/bin"})
    except subprocess.TimeoutExpired:
        pytest.fail("the GGUF loader hung on a crafted array count")
    assert "REFUSED" in r.stdout, r.stdout + r.stderr
    assert str(path) in r.stdout and "test" in r.stdout  # names the file and the field


def test_d3_crafted_gguf_string_and_tensor_counts(tmp_path):
    from polymodal.interop.gguf import GGUFFile

    path = tmp_path / "s.gguf"
    # a key whose string length runs past the end of the file
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 2 ** 40) + b"abc")
    with pytest.raises(CheckpointError, match="s.gguf"):
        GGUFFile(path)
    # more tensors than the file could describe
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2 ** 50, 0))
    with pytest.raises(CheckpointError, match="tensor"):
        GGUFFile(path)
    # an unknown GGUF version
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 99, 0, 0))
    with pytest.raises(CheckpointError, match="version"):
        GGUFFile(path)


# -- defect 4: checkpoint SHA-256 sums and non-finite weights ----------------------------------------------

def _nan_into(path, tensor):
    """Overwrites the first 8 bytes of ``tensor``'s data in a safetensors file with NaN (same size)."""
    raw = bytearray(path.read_bytes())
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    start = 8 + n + header[tensor]["data_offsets"][0]
    raw[start:start + 8] = struct.pack("<ff", float("nan"), float("nan"))
    path.write_bytes(bytes(raw))


def _training_checkpoint(tmp_path):
    from polymodal.models.gpt import GPTConfig
    from polymodal.train.checkpoint import model_state, save_checkpoint

    from polymodal.tokenizers import train_char_tokenizer

    tok = train_char_tokenizer(string.ascii_letters + string.digits + " \n")  # 64 + <unk> = nano-llama's 65
    torch.manual_seed(0)
    model = build_model(GPTConfig.from_preset("nano-llama"))
    return save_checkpoint(tmp_path / "run", step=1, model_config=model.config, model_sd=model_state(model),
                           optimizer_sd=None, trainer_state={}, rng={}, tokenizer=tok)


def test_d4_load_verifies_checkpoint_sums(tmp_path):
    ckpt = _training_checkpoint(tmp_path)
    polymodal.load(ckpt)  # intact: loads
    _nan_into(ckpt / "model.safetensors", "wte.weight")
    for spec in (ckpt, tmp_path / "run"):  # the checkpoint, and the run folder resolving to it
        with pytest.raises(CheckpointError, match=r"wte\.weight.*checksum|checksum.*wte\.weight") as e:
            polymodal.load(spec)
        assert str(ckpt / "model.safetensors") in str(e.value) and "\n" not in str(e.value)


def test_d4_load_refuses_non_finite_weights(tmp_path):
    from polymodal.models.gpt import GPTConfig

    torch.manual_seed(0)
    folder = save_model(build_model(GPTConfig.from_preset("nano-llama")), tmp_path / "m")  # no trainer_state.json
    _nan_into(folder / "model.safetensors", "blocks.0.mlp.proj.weight")
    with pytest.raises(CheckpointError, match=r"blocks\.0\.mlp\.proj\.weight.*non-finite") as e:
        polymodal.load(folder)
    assert str(folder / "model.safetensors") in str(e.value)


def test_d4_generate_cli_one_line_error(tmp_path):
    from train_harness import run_cli

    ckpt = _training_checkpoint(tmp_path)
    _nan_into(ckpt / "model.safetensors", "wte.weight")
    r = run_cli(["generate", "--model", str(tmp_path / "run"), "--prompt", "a", "--max-new-tokens", "2"], timeout=120)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "wte.weight" in r.stderr and "Traceback" not in r.stderr


# -- defect 5: a seed outside 64 bits is a 400 ------------------------------------------------------------

@pytest.mark.parametrize("route", ["/v1/chat/completions", "/v1/completions"])
def test_d5_huge_seed_is_400(srv, route):
    body = _chat_body(seed=2 ** 64) if "chat" in route else {"model": "tiny", "prompt": "hi", "max_tokens": 3,
                                                              "seed": 2 ** 64}
    _err(httpx.post(srv.url + route, json=body), 400, "invalid_value")
    body["seed"] = 2 ** 64 - 1  # the largest seed, with a second choice (seed + 1) and sampling
    r = httpx.post(srv.url + route, json={**body, "n": 2, "temperature": 1.0})
    assert r.status_code == 200, r.text


# -- defect 7: serve accepts a training run folder -------------------------------------------------------

def test_d7_served_run_folder(tmp_path):
    """`serve --model vlm=runs/vlm-easy`: a run folder (its config.json is the recipe) serves its
    best model/ export, like chat and vqa do."""
    import shutil

    folder = _tiny_gpt_folder(tmp_path)
    run = tmp_path / "runs" / "vlm-easy"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"command": "train-vlm", "flags": {"lr": 1e-3}}))
    shutil.copytree(folder, run / "model")
    sm = ServedModel.load(f"vlm={run}", context=CONTEXT)
    assert sm.name == "vlm" and sm.kind == "generate"
    assert ServedModel.load(str(run), context=CONTEXT).name == "vlm-easy"


# -- defect 8: unsupported request fields are refused ------------------------------------------------------

@pytest.mark.parametrize("extra,param", [
    ({"response_format": {"type": "json_object"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"logit_bias": {"5": 10}}, "logit_bias"),
])
def test_d8_unsupported_parameters_are_400(srv, extra, param):
    e = _err(httpx.post(srv.url + "/v1/chat/completions", json=_chat_body(**extra)), 400, "unsupported_parameter")
    assert e["param"] == param


def test_d8_neutral_values_are_accepted(srv):
    for extra in ({"response_format": {"type": "text"}}, {"tools": []}, {"tool_choice": "none"}, {"logit_bias": {}}):
        r = httpx.post(srv.url + "/v1/chat/completions", json=_chat_body(**extra))
        assert r.status_code == 200, (extra, r.text)
    r = httpx.post(srv.url + "/v1/completions", json={"model": "tiny", "prompt": "a", "suffix": "b"})
    _err(r, 400, "unsupported_parameter")


# -- defect 9: cross-site requests -----------------------------------------------------------------------

def test_d9_cross_origin_refused(srv):
    url = srv.url + "/v1/chat/completions"
    _err(httpx.post(url, json=_chat_body(), headers={"Origin": "http://evil.example"}), 403, "cross_origin_refused")
    # a "simple" cross-site form post (text/plain) is not parsed as JSON
    r = httpx.post(url, content=json.dumps(_chat_body()).encode(), headers={"Content-Type": "text/plain"})
    _err(r, 415, "unsupported_media_type")
    # DNS rebinding: a foreign Host on a loopback server
    _err(httpx.post(url, json=_chat_body(), headers={"Host": "evil.example"}), 403, "host_not_allowed")
    _err(httpx.post(srv.url + "/playground/search", json={"query": "x"}, headers={"Origin": "http://evil.example"}),
         403, "cross_origin_refused")


def test_d9_same_origin_and_allowed_origin(srv):
    url = srv.url + "/v1/chat/completions"
    assert httpx.post(url, json=_chat_body(), headers={"Origin": srv.url}).status_code == 200  # the playground
    r = httpx.post(url, json=_chat_body(), headers={"Origin": "http://allowed.example"})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "http://allowed.example"
    pre = httpx.options(url, headers={"Origin": "http://allowed.example", "Access-Control-Request-Method": "POST",
                                      "Access-Control-Request-Headers": "authorization, content-type"})
    assert pre.status_code == 204 and "POST" in pre.headers["access-control-allow-methods"]
    assert "authorization" in pre.headers["access-control-allow-headers"].lower()
    bad = httpx.options(url, headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert bad.status_code == 403 and "access-control-allow-origin" not in bad.headers


# -- defect 11: bad ports give one line ------------------------------------------------------------------

def test_d11_port_out_of_range(tmp_path):
    from polymodal import cli

    r = subprocess.run([sys.executable, "-m", "polymodal.cli", "serve", "--port", "99999"], capture_output=True,
                       text=True, timeout=120, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "--port" in r.stderr and "65535" in r.stderr
    assert cli.main(["serve", "--port", "-1"]) == 2


def test_d11_busy_port(tmp_path, capsys):
    from polymodal import cli

    folder = _tiny_gpt_folder(tmp_path)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        rc = cli.main(["serve", "--model", str(folder), "--port", str(port)])
    finally:
        busy.close()
    out = capsys.readouterr()
    assert rc == 2 and f"127.0.0.1:{port}" in out.err and "in use" in out.err, out
    assert "http://" not in out.out  # no playground URL for a server that never listened


# -- defect 6: serving is part of the default install; without it, the exact install command ------------

def test_d6_serving_in_default_install_else_the_install_command(monkeypatch, capsys):
    import tomllib
    from pathlib import Path

    from polymodal import cli

    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    deps = [d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]]
    assert "fastapi" in deps and "uvicorn" in deps
    monkeypatch.setitem(sys.modules, "uvicorn", None)  # as if it were not installed
    assert cli.main(["serve"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'fastapi>=0.110' 'uvicorn>=0.29'" in err and "Traceback" not in err


# -- server flags as vLLM users expect: request log, --served-model-name, --chat-template, --cors-origin -----

def test_request_log_one_record_per_request_without_content(tmp_path):
    records = []
    gpt = ServedModel.load(f"tiny={_tiny_gpt_folder(tmp_path)}", context=CONTEXT)
    with ServerThread(create_app([gpt], request_log=records.append)) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json=_chat_body(messages=[{"role": "user", "content": "SECRET"}]))
        streamed = httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "SECRET", "max_tokens": 4,
                                                                "stream": True, "stream_options": {"include_usage": True}}).text
        _err(httpx.post(s.url + "/v1/chat/completions", json={"model": "nope", "messages": []}), 400)
    assert "[DONE]" in streamed and len(records) == 3
    chat, stream, bad = records
    assert chat["id"] == r.headers["x-request-id"] and chat["path"] == "/v1/chat/completions"
    assert chat["model"] == "tiny" and chat["status"] == 200 and chat["latency_s"] >= 0
    assert chat["completion_tokens"] == r.json()["usage"]["completion_tokens"]
    assert chat["prompt_tokens"] == r.json()["usage"]["prompt_tokens"]
    usage = json.loads([ln for ln in streamed.splitlines() if '"usage"' in ln][-1][6:])["usage"]
    assert stream["status"] == 200 and stream["completion_tokens"] == usage["completion_tokens"]
    assert bad["status"] == 400
    assert "SECRET" not in json.dumps(records)  # never the text without --log-content


def test_request_log_content_when_asked(tmp_path):
    records = []
    gpt = ServedModel.load(f"tiny={_tiny_gpt_folder(tmp_path)}", context=CONTEXT)
    with ServerThread(create_app([gpt], request_log=records.append, log_content=True)) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json=_chat_body(messages=[{"role": "user", "content": "SECRET"}]))
        httpx.post(s.url + "/v1/completions", json={"model": "tiny", "prompt": "SECRET", "max_tokens": 4, "stream": True})
    assert records[0]["request"]["messages"][0]["content"] == "SECRET"
    assert records[0]["reply"] == [r.json()["choices"][0]["message"]["content"]]
    assert records[1]["request"]["prompt"] == "SECRET" and len(records[1]["reply"]) == 1


def test_serve_cli_flags(tmp_path, monkeypatch, capsys):
    from polymodal import cli

    folder = _tiny_gpt_folder(tmp_path)
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]")
    started = {}

    def fake_serve(app, sock):
        started["app"] = app
        sock.close()

    monkeypatch.setattr("polymodal.serve.server.serve_forever", fake_serve)
    assert cli.main(["serve", "--model", str(folder), "--served-model-name", "my-model", "--chat-template",
                     str(template), "--cors-origin", "https://app.example", "--port", "0",
                     "--max-context", str(CONTEXT)]) == 0
    state = started["app"].state.server
    assert list(state.models) == ["my-model"] and state.options.cors_origins == ("https://app.example",)
    assert state.models["my-model"].tokenizer.chat_template == template.read_text()
    assert state.options.request_log is not None and not state.options.log_content
    with ServerThread(started["app"]) as s:
        r = httpx.post(s.url + "/v1/chat/completions", json={**_chat_body(), "model": "my-model"})
        assert r.status_code == 200 and r.json()["model"] == "my-model"
    assert '"model": "my-model"' in capsys.readouterr().out  # the request log line (stdout, JSON)
    assert cli.main(["serve", "--model", str(folder), "--served-model-name", "a", "b", "--port", "0"]) == 2
    assert "--served-model-name gives 2 names for 1 --model" in capsys.readouterr().err
    assert cli.main(["serve", "--model", str(folder), "--chat-template", str(tmp_path / "none.jinja"), "--port", "0"]) == 2
