"""The server through HTTP with the official ``openai`` client: routes, streaming, mixed adapters under
concurrency and LRU churn, limits, admin (issue 27)."""

from __future__ import annotations

import concurrent.futures
import json
import socket

from conftest import ADMIN_KEY, Running, alone, http

MESSAGES = [{"role": "user", "content": "Name a colour."}]


def _ask(client, model, content, **kwargs):
    response = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                              temperature=0, max_tokens=8, **kwargs)
    return response.choices[0].message.content


def test_models_lists_the_base_and_every_adapter(running):
    ids = [m.id for m in running.client().models.list().data]
    assert ids[0] == running.server.config.base_name and ids[1:] == sorted(f"ad{i}" for i in range(10))


def test_chat_and_completions_equal_the_model_alone(running, served_files, tokenizer):
    base, _, adapters = served_files
    client = running.client()
    for model, adapter in ((running.server.config.base_name, None), ("ad3", adapters["ad3"])):
        response = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=8)
        assert response.choices[0].message.content == alone(base, tokenizer, adapter, MESSAGES)
        assert response.object == "chat.completion" and response.model == model
        usage = response.usage
        assert usage.completion_tokens <= 8 and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        assert response.choices[0].finish_reason in ("stop", "length")
    ids = tokenizer("The sky is", add_special_tokens=True)["input_ids"]
    text = client.completions.create(model="ad1", prompt="The sky is", temperature=0, max_tokens=8).choices[0].text
    assert text == alone(base, tokenizer, adapters["ad1"], prompt_ids=ids)


def test_streaming_gives_the_same_text(running):
    client = running.client()
    for model in ("ad0", "ad5", running.server.config.base_name):
        whole = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=12)
        chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=12,
                                                     stream=True, stream_options={"include_usage": True}))
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
        plain = client.completions.create(model=model, prompt="Once upon", temperature=0, max_tokens=10)
        streamed = "".join(c.choices[0].text for c in client.completions.create(
            model=model, prompt="Once upon", temperature=0, max_tokens=10, stream=True))
        assert streamed == plain.choices[0].text


def _concurrent_equals_alone(server, served_files, tokenizer):
    base, _, adapters = served_files
    client = server.client()
    jobs = [(f"ad{i}", f"Tell me about {word}.") for i in range(10) for word in ("cats", "the sea", "bread")]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: _ask(client, *job), jobs))
    for (model, content), answer in zip(jobs, answers):
        expected = alone(base, tokenizer, adapters[model], [{"role": "user", "content": content}])
        assert answer == expected, (model, content)


def test_ten_adapters_three_concurrent_requests_each_equal_each_adapter_alone(running, served_files, tokenizer):
    _concurrent_equals_alone(running, served_files, tokenizer)


def test_lru_churn_with_two_resident_changes_no_output(served_files, tokenizer):
    base, root, _ = served_files
    server = Running(base, root, max_loaded=2, max_batch=8)
    try:
        _concurrent_equals_alone(server, served_files, tokenizer)
        assert len(server.server.loaded) <= 2 and len(server.server.slots.slots) <= 2
    finally:
        server.stop()


def test_seeded_sampling_repeats_and_n_choices(running):
    client = running.client()
    kwargs = dict(model="ad2", messages=MESSAGES, temperature=1.0, max_tokens=10, seed=11)
    first = client.chat.completions.create(**kwargs, n=3)
    again = client.chat.completions.create(**kwargs, n=3)
    assert [c.message.content for c in first.choices] == [c.message.content for c in again.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]


def test_stop_strings_cut_the_answer(running):
    client = running.client()
    free = _ask(client, "ad4", "Count with me.")
    stop = free[3:6]
    cut = client.chat.completions.create(model="ad4", messages=[{"role": "user", "content": "Count with me."}],
                                         temperature=0, max_tokens=8, stop=[stop])
    assert cut.choices[0].message.content == free[:free.index(stop)] and cut.choices[0].finish_reason == "stop"


def test_metrics_in_prometheus_text(running):
    _ask(running.client(), "ad7", "Hello")
    status, head, text = http(running.root + "/metrics")
    assert status == 200 and head["content-type"].startswith("text/plain")
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    assert float(values["tunesmith_generated_tokens_total"]) > 0 and values["tunesmith_queue_depth"] == "0"
    assert float(values['tunesmith_requests_total{model="ad7"}']) >= 1


def test_admin_loads_and_unloads_by_name(running):
    url = running.root + "/admin/adapters/"
    assert http(url + "load", body={"name": "ad9"}, key=ADMIN_KEY)[2]["loaded"] == "ad9"
    assert "ad9" in running.server.loaded
    assert http(url + "unload", body={"name": "ad9"}, key=ADMIN_KEY)[2]["unloaded"] == "ad9"
    assert "ad9" not in running.server.loaded
    assert http(url + "load", body={"name": "ad9"})[0] == 401  # the API key is not the admin key
    assert http(url + "load", body={"name": "../ad9"}, key=ADMIN_KEY)[0] == 400


def test_queue_full_is_429_with_retry_after(served_files):
    base, root, _ = served_files
    server = Running(base, root, max_batch=1, max_queue=1)
    try:
        body = {"model": "ad0", "prompt": "x", "max_tokens": 500, "temperature": 0}
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            results = list(pool.map(lambda _: http(server.url + "/completions", body=body), range(3)))
        statuses = sorted(status for status, _, _ in results)
        assert statuses == [200, 200, 429]
        _, head, error = next(r for r in results if r[0] == 429)
        assert head["retry-after"] == "1" and error["error"]["code"] == "queue_full"
    finally:
        server.stop()


def test_a_client_that_disconnects_frees_its_row(running):
    import time

    body = json.dumps({"model": "ad1", "prompt": "x", "max_tokens": 450, "temperature": 0, "stream": True})
    port = int(running.root.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall((f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer test-key\r\n"
                      f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode())
        received = b""
        while b"data:" not in received:  # the headers may come alone, then the first event
            received += sock.recv(4096)
        assert running.server.engine.running  # it is generating
    deadline = time.time() + 20
    while running.server.engine.running or running.server.outstanding:
        assert time.time() < deadline, "the disconnected request still holds a row"
        time.sleep(0.05)


def test_usage_counts(running):
    status, _, body = http(running.url + "/completions", body={"model": "ad0", "prompt": "Hi", "max_tokens": 5,
                                                               "temperature": 0})
    assert status == 200 and body["usage"]["completion_tokens"] <= 5 and body["object"] == "text_completion"
