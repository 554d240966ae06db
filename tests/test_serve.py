"""`dualenc serve` (dualenc.serve): the HTTP service on a real socket against dualenc's own functions (embeddings,
search, zero-shot), its batching (each answer equal to the request's own, a bounded compile count), refusals of
malformed and hostile requests, thumbnails only under the image root, the API key, and SIGTERM's drain."""

import base64
import concurrent.futures
import io
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import numpy as np
import pytest
from PIL import Image

import dualenc
from dualenc import data
from dualenc.search import index as search_index
from dualenc.serve import Batcher, Limits, Service, create_app
from dualenc.serve.metrics import Metrics

# one worker builds the module's fixtures once (their references are the costly part)
pytestmark = pytest.mark.xdist_group("serve")

KEY = "test-key"
MAX_PIXELS = 100_000


def png(array) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG")
    return out.getvalue()


def data_url(raw: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(raw).decode()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model saved to disk, 12 images under root/photos, an index of them (and of two names that lead
    out of the root: '../secret.png' and a symlink to it)."""
    root = tmp_path_factory.mktemp("serve")
    data.write_vocab(root / "vocab", ["a photo of a red square", "a blue square on a green field", "the digit"])
    processor = dualenc.Processor(dualenc.ImageProcessor(size={"height": 16, "width": 16}),
                                  dualenc.Tokenizer.from_pretrained(root / "vocab", max_length=16))
    size = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37)
    config = dualenc.DualEncoderConfig(dualenc.ViTConfig(**size, image_size=16, patch_size=8),
                                       dualenc.BertConfig(**size, vocab_size=processor.tokenizer.vocab_size,
                                                          max_position_embeddings=16), projection_dim=8)
    import jax

    params = dualenc.init(jax.random.key(0), config)
    dualenc.save_pretrained(root / "model", config, params, processor=processor)
    rng = np.random.default_rng(0)
    names, images = [], []
    for i in range(12):
        name = f"photos/{i % 3}/{i:02d}.png"
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        raw = png(rng.integers(0, 256, (12 + i, 12, 3), dtype=np.uint8))
        (root / name).write_bytes(raw)
        names.append(name)
        images.append(raw)
    outside = root.parent / f"{root.name}-secret.png"
    outside.write_bytes(images[0])
    os.symlink(outside, root / "photos" / "link.png")
    embeds = dualenc.encode_images(params, config, processor, [root / n for n in names])
    with search_index.IndexWriter(root / "photos.safetensors", config.projection_dim, "image",
                                  {"model_sha256": search_index.model_fingerprint(params)}) as writer:
        writer.add(np.concatenate([embeds, embeds[:2]]), names + [f"../{outside.name}", "photos/link.png"])
    return root, config, params, processor, images


@pytest.fixture(scope="module")
def server(workspace):
    """The service on uvicorn in a thread, on a free loopback port, with an API key; yields (base URL, Service)."""
    import uvicorn

    root, config, params, processor, _ = workspace
    index = search_index.open_index(root / "photos.safetensors")
    service = Service(params, config, processor, name="tiny", index=index, image_root=root, api_key=KEY,
                      limits=Limits(max_body_bytes=200_000, max_pixels=MAX_PIXELS, max_inputs=40, timeout_s=60))
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(service), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not uv.started and time.time() < deadline:
        time.sleep(0.05)
    assert uv.started
    yield f"http://127.0.0.1:{port}", service
    uv.should_exit = True
    thread.join(30)


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server[0], headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as c:
        yield c


def test_embeddings_equal_dualencs_encoders(client, workspace):
    _, config, params, processor, images = workspace
    texts = ["a photo of a red square", "the digit", "a blue square on a green field"]
    body = {"input": [texts[0], {"image": data_url(images[3])}, {"text": texts[1]},
                      {"image": base64.b64encode(images[5]).decode()}, texts[2]], "model": "anything"}
    got = client.post("/v1/embeddings", json=body)
    assert got.status_code == 200, got.text
    out = got.json()
    assert out["object"] == "list" and out["model"] == "tiny" and [d["index"] for d in out["data"]] == list(range(5))
    rows = np.asarray([d["embedding"] for d in out["data"]], np.float32)
    want_texts = dualenc.encode_texts(params, config, processor, texts)
    want_images = dualenc.encode_images(params, config, processor, [Image.open(io.BytesIO(images[i])) for i in (3, 5)])
    np.testing.assert_allclose(rows[[0, 2, 4]], want_texts, atol=1e-6)
    np.testing.assert_allclose(rows[[1, 3]], want_images, atol=1e-6)
    tokens = int(processor.tokenizer(texts, max_length=16, padding="longest")["attention_mask"].sum())
    assert out["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "images": 2}
    one = client.post("/v1/embeddings", json={"input": texts[1], "encoding_format": "base64"}).json()
    decoded = np.frombuffer(base64.b64decode(one["data"][0]["embedding"]), "<f4")
    np.testing.assert_allclose(decoded, want_texts[1], atol=1e-6)


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(client, server, workspace):
    _, config, params, processor, images = workspace
    service = server[1]
    words = "a photo of the red blue green square field digit on".split()
    texts = [" ".join(words[:1 + i % 9]) + f" {i}" for i in range(24)]
    inputs = [{"input": t} for t in texts] + [{"input": [{"image": data_url(images[i % 12])}]} for i in range(12)]
    alone = [client.post("/v1/embeddings", json=body).json()["data"] for body in inputs]
    compiled = service.metrics.compile_count()

    def post(body):
        with httpx.Client(base_url=server[0], headers={"x-api-key": KEY}, timeout=60) as c:
            return c.post("/v1/embeddings", json=body).json()["data"]

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        together = list(pool.map(post, inputs * 2))
    for got, want in zip(together, alone * 2):
        np.testing.assert_allclose(got[0]["embedding"], want[0]["embedding"], atol=1e-6)
    np.testing.assert_allclose([d[0]["embedding"] for d in alone[:24]],
                               dualenc.encode_texts(params, config, processor, texts), atol=1e-6)
    sizes, lengths = service.batcher.sizes, service.batcher.lengths
    assert compiled >= 2 and service.metrics.compile_count() <= len(sizes) * (len(lengths) + 1)  # text + image

    # Rows queued while a batch runs go together: 20 one-text requests in fewer than 20 batches, each its own row;
    # without batching, one batch each.
    want = dualenc.encode_texts(params, config, processor, texts[:20])
    for batching in (True, False):
        metrics = Metrics()
        batcher = Batcher(params, config, processor, max_batch=32, batching=batching, metrics=metrics)
        try:
            futures = [batcher.submit("text", batcher.prepare_texts([t])[0]) for t in texts[:20]]
            np.testing.assert_allclose(np.concatenate([f.result(60) for f in futures]), want, atol=1e-6)
        finally:
            batcher.close()
        batches = sum(metrics.padded_rows.values())
        assert batches < 20 if batching else batches == 20
    text = client.get("/metrics").text
    batches = {int(m) for m in re.findall(r'dualenc_batches_total\{rows="(\d+)",tower="text"\} \d+', text)}
    assert batches <= set(sizes)


def test_search_matches_dualenc_search(client, workspace):
    root, config, params, processor, images = workspace
    index = search_index.open_index(root / "photos.safetensors")
    names = index.names()
    query = dualenc.encode_texts(params, config, processor, ["a red square"])
    want = search_index.search(index, query, 5)
    out = client.post("/v1/search", json={"query": "a red square", "top_k": 5}).json()
    assert [r["name"] for r in out["results"]] == [names[i] for i in want.rows[0]]
    np.testing.assert_allclose([r["score"] for r in out["results"]], want.scores[0], atol=1e-6)
    assert [r["rank"] for r in out["results"]] == [1, 2, 3, 4, 5]
    assert out["results"][0]["thumbnail"] == "/thumbnails/" + names[want.rows[0][0]]

    image = client.post("/v1/search", json={"query": {"image": data_url(images[4])}, "top_k": 3}).json()
    assert image["results"][0]["name"] == "photos/1/04.png" and image["results"][0]["score"] > 0.999

    alike = client.post("/v1/search", json={"query": {"item": "photos/1/04.png"}, "top_k": 13}).json()["results"]
    scores, rows = search_index.search_exact(index, index.embeddings[[4]], 13, leave_out=[4])
    assert len(alike) == 13 and "photos/1/04.png" not in [r["name"] for r in alike]
    assert [r["name"] for r in alike] == [names[i] for i in rows[0]]

    thumb = client.get(alike[0]["thumbnail"])
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(thumb.content)).size == Image.open(root / alike[0]["name"]).size


def test_classify_matches_zero_shot(client, workspace):
    _, config, params, processor, images = workspace
    labels = ["red square", "blue square", "digit"]
    for templates in (None, ["a photo of a {}", "the {}"]):
        body = {"labels": labels, "images": [data_url(images[i]) for i in (0, 7)]}
        if templates:
            body["templates"] = templates
        out = client.post("/v1/classify", json=body)
        assert out.status_code == 200, out.text
        classifier = dualenc.zero_shot_classifier(params, config, processor, labels, templates or "default")
        embeds = dualenc.encode_images(params, config, processor, [Image.open(io.BytesIO(images[i])) for i in (0, 7)])
        top, probs = dualenc.zero_shot_predict(embeds, classifier, k=3, params=params)
        for got, row, ps in zip(out.json()["results"], top, probs):
            assert got["labels"] == [labels[j] for j in row]
            np.testing.assert_allclose(got["probabilities"], ps, atol=1e-5)


def bomb() -> bytes:
    """A PNG 4,000 x 4,000 (16 million pixels) in a few kilobytes."""
    out = io.BytesIO()
    Image.new("1", (4000, 4000)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def test_malformed_and_hostile_requests_get_4xx_json_naming_the_field(client, server, workspace):
    _, _, _, _, images = workspace
    good = data_url(images[0])
    cases = [
        ("/v1/embeddings", b"{not json", 400, "body"),
        ("/v1/embeddings", b"[1, 2]", 422, "body"),
        ("/v1/embeddings", {"inputs": "x"}, 422, "inputs"),
        ("/v1/embeddings", {"input": []}, 422, "input"),
        ("/v1/embeddings", {"input": ["ok", 3]}, 422, "input[1]"),
        ("/v1/embeddings", {"input": ["ok", {"text": ""}]}, 422, "input[1].text"),
        ("/v1/embeddings", {"input": ["x"] * 41}, 413, "input"),
        ("/v1/embeddings", {"input": "y" * 300_000}, 413, "body"),
        ("/v1/embeddings", {"input": [{"image": "http://169.254.169.254/latest"}]}, 400, "input[0].image"),
        ("/v1/embeddings", {"input": [{"image": "file:///etc/passwd"}]}, 400, "input[0].image"),
        ("/v1/embeddings", {"input": [{"image": "data:image/png,abc"}]}, 400, "input[0].image"),
        ("/v1/embeddings", {"input": ["ok", {"image": "not base64!"}]}, 400, "input[1].image"),
        ("/v1/embeddings", {"input": [{"image": data_url(b"GIF89a nothing")}]}, 400, "input[0].image"),
        ("/v1/embeddings", {"input": [{"image": data_url(bomb())}]}, 413, "input[0].image"),
        ("/v1/embeddings", {"input": [{"image": good}, {"image": data_url(images[1][:60])}]}, 400, "input[1].image"),
        ("/v1/embeddings", {"input": "x", "encoding_format": "int8"}, 422, "encoding_format"),
        ("/v1/search", {"query": "x", "top_k": 0}, 422, "top_k"),
        ("/v1/search", {"query": "x", "top_k": 1000}, 422, "top_k"),
        ("/v1/search", {"query": "x", "top_k": "5"}, 422, "top_k"),
        ("/v1/search", {"query": {"text": "x", "image": good}}, 422, "query"),
        ("/v1/search", {"query": {"item": "../../etc/passwd"}}, 404, "query.item"),
        ("/v1/search", {"query": {"image": "https://example.com/a.png"}}, 400, "query.image"),
        ("/v1/classify", {"labels": [], "images": [good]}, 422, "labels"),
        ("/v1/classify", {"labels": ["a", "b"], "images": [good], "templates": ["no placeholder"]}, 422, "templates"),
        ("/v1/classify", {"labels": ["a", "b"], "images": "x"}, 422, "images"),
    ]
    for path, body, status, field in cases:
        kw = {"content": body} if isinstance(body, bytes) else {"json": body}
        got = client.post(path, **kw)
        assert got.status_code == status, (path, body if len(str(body)) < 200 else field, got.text)
        assert got.json()["error"]["field"] == field, (path, field, got.text)
        assert "Traceback" not in got.text
    for path, status in [("/thumbnails/..%2F..%2Fetc%2Fpasswd", 404), ("/thumbnails/photos/9.png", 404),
                         ("/thumbnails/" + "..%2F" + f"{workspace[0].name}-secret.png", 403),
                         ("/thumbnails/photos/link.png", 403), ("/thumbnails/%2Fetc%2Fpasswd", 404)]:
        got = client.get(path)
        assert got.status_code == status and got.json()["error"]["field"] == "name", (path, got.text)
    anonymous = httpx.post(server[0] + "/v1/embeddings", json={"input": "x"})
    wrong = httpx.post(server[0] + "/v1/embeddings", json={"input": "x"}, headers={"Authorization": "Bearer nope"})
    assert anonymous.status_code == wrong.status_code == 401 and wrong.json()["error"]["field"] == "authorization"
    assert httpx.get(server[0] + "/healthz").json()["status"] == "ok"  # open without the key
    assert client.get("/nowhere").status_code == 404 and client.get("/v1/search").status_code == 405
    after = client.post("/v1/embeddings", json={"input": ["still here", {"image": good}]})
    assert after.status_code == 200 and len(after.json()["data"]) == 2
    metrics = client.get("/metrics").text
    assert re.search(r'dualenc_requests_total\{route="/v1/embeddings",method="POST",status="413"\} [1-9]', metrics)
    assert "dualenc_compiles_total{" in metrics and "dualenc_request_duration_seconds_bucket{" in metrics
    assert client.get("/").status_code == 200 and "dualenc" in client.get("/").text


def test_sigterm_finishes_in_flight_requests_and_exits_0(workspace):
    root = workspace[0]
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dualenc.cli", "serve", "--model", root / "model", "--port",
                             str(port), "--log-level", "warning"], stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                if httpx.get(base + "/healthz").json()["status"] == "ok":
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"labels": [f"label {i}" for i in range(100)], "images": [data_url(workspace[4][0])]}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            pending = pool.submit(httpx.post, base + "/v1/classify", json=body, timeout=60)
            while "dualenc_requests_in_flight 2" not in httpx.get(base + "/metrics").text:  # and this one
                assert not pending.done() and time.time() < deadline + 60
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            assert not pending.done()
            answer = pending.result(60)
        assert answer.status_code == 200 and len(answer.json()["results"][0]["labels"]) == 100
        assert proc.wait(60) == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    with pytest.raises(httpx.TransportError):
        httpx.get(base + "/healthz")
