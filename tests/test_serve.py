"""fastchat-ft serve (transformers backend): the `openai` client over loopback gets the same greedy reply as
our generation loop / transformers' generate, streamed (SSE) and not, with usage and finish reasons; bad
requests get OpenAI-shaped errors. Every request is bounded and the server is stopped at the end."""
import threading

import pytest
import torch

from fastchat_ft.inference import ChatStream, load_model
from fastchat_ft.serve import make_server, vllm_command
from test_export_fixtures import chatty_run, tiny_run, tiny_run_new_tokens  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def server(chatty_run):
    loaded = load_model(chatty_run["run"], device="cpu")
    srv = make_server(loaded, "127.0.0.1", 0, default_max_tokens=16)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(timeout=10)
    assert not thread.is_alive()


@pytest.fixture()
def client(server):
    openai = pytest.importorskip("openai")
    port = server.server_address[1]
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", timeout=60, max_retries=0)


MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "the cat sat on a mat?"}]


def _expected(server, n):
    s = ChatStream(server.loaded.model, server.loaded.tokenizer, MSGS, max_new_tokens=n)
    s.run()
    prompt = torch.tensor([s.prompt_ids])
    with torch.no_grad():  # our loop itself agrees with transformers' generate (test_inference checks it too)
        ref = server.loaded.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n,
                                           do_sample=False, eos_token_id=s.stop_ids, pad_token_id=0)
    assert ref[0, prompt.shape[1]:].tolist() == s.token_ids
    return s


def test_chat_completion(server, client):
    exp = _expected(server, 7)
    r = client.chat.completions.create(model="x", messages=MSGS, max_tokens=7, temperature=0)
    assert r.choices[0].message.content == exp.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 7 and r.usage.prompt_tokens == exp.prompt_tokens


def test_chat_completion_streaming(server, client):
    exp = _expected(server, 6)
    chunks = list(client.chat.completions.create(model="x", messages=MSGS, max_tokens=6, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == exp.text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) >= 2  # really streamed
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].usage.completion_tokens == 6


def test_models_and_errors(server, client):
    import openai
    assert [m.id for m in client.models.list().data] == [server.model_name]
    with pytest.raises(openai.BadRequestError, match="messages"):
        client.chat.completions.create(model="x", messages=[], max_tokens=3)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="x", messages=MSGS, max_tokens=-2)


def test_stop_reason_on_a_model_that_ends_its_turn(tiny_run):
    openai = pytest.importorskip("openai")
    srv = make_server(load_model(tiny_run["run"], device="cpu"), "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="u", timeout=60,
                          max_retries=0)
        r = c.chat.completions.create(model="x", messages=MSGS, max_tokens=50, temperature=0)
        assert r.choices[0].finish_reason == "stop" and "<|im_end|>" not in r.choices[0].message.content
    finally:
        srv.shutdown()
        srv.server_close()


def test_vllm_command_for_lora_and_model(tiny_run):
    cmd = vllm_command(str(tiny_run["run"]), "127.0.0.1", 8123)
    assert cmd[cmd.index("--model") + 1] == str(tiny_run["base"].resolve())
    assert f"finetuned={tiny_run['run'] / 'final'}" in cmd and "--enable-lora" in cmd
    cmd = vllm_command(str(tiny_run["base"]), "127.0.0.1", 8123)
    assert cmd[cmd.index("--model") + 1] == str(tiny_run["base"]) and "--enable-lora" not in cmd


@pytest.mark.parametrize("field, value", [("temperature", "hot"), ("top_p", [1]), ("max_tokens", True),
                                          ("temperature", None)])
def test_request_fields_of_the_wrong_type_are_a_400_not_a_dropped_connection(field, value):
    from fastchat_ft.serve import RequestError, parse_chat_request
    req = {"messages": [{"role": "user", "content": "hi"}], field: value}
    if value is None:  # absent/null: the OpenAI default, not an error
        assert parse_chat_request(req, 8)[1]["temperature"] == 1.0
        return
    with pytest.raises(RequestError, match=field) as err:
        parse_chat_request(req, 8)
    assert err.value.param == field and err.value.status == 400


@pytest.mark.parametrize("field, value", [("top_p", 0), ("top_p", 1.5), ("temperature", -1), ("temperature", 2.5),
                                          ("max_tokens", 0), ("max_completion_tokens", -4)])
def test_out_of_range_request_values_are_a_400_naming_that_field(field, value):
    # top_p 0 used to be reported as param "temperature"; max_tokens 0 silently meant the server's default
    from fastchat_ft.serve import RequestError, parse_chat_request
    with pytest.raises(RequestError, match=field) as err:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], field: value}, 8)
    assert err.value.param == field and err.value.status == 400


def test_top_p_0_is_accepted_with_greedy_decoding_only():
    # as generate (one rule): temperature 0 uses no top_p; sampling with top_p 0 would keep no token
    from fastchat_ft.serve import RequestError, parse_chat_request
    hi = [{"role": "user", "content": "hi"}]
    opts = parse_chat_request({"messages": hi, "temperature": 0, "top_p": 0}, 8)[1]
    assert (opts["temperature"], opts["top_p"]) == (0, 0)
    with pytest.raises(RequestError, match="sampling") as err:
        parse_chat_request({"messages": hi, "temperature": 0.5, "top_p": 0}, 8)
    assert err.value.param == "top_p" and err.value.status == 400


def test_make_server_on_a_busy_port_is_a_config_error():
    # a failed bind made ThreadingHTTPServer call server_close() before __init__ had set _open_lock:
    # an AttributeError traceback after the OSError one
    import socket

    from fastchat_ft.errors import ConfigError
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        with pytest.raises(ConfigError, match="in use") as err:
            make_server(None, "127.0.0.1", busy.getsockname()[1])
    assert err.value.field == "--port" and err.value.fix


def test_unknown_roles_are_a_400_and_developer_is_the_system_turn():
    from fastchat_ft.serve import RequestError, parse_chat_request
    with pytest.raises(RequestError, match="'usr' is not one of system") as err:
        parse_chat_request({"messages": [{"role": "usr", "content": "hi"}]}, 8)
    assert err.value.status == 400 and err.value.param == "messages[0].role"
    messages = parse_chat_request({"messages": [{"role": "developer", "content": "Be brief."},
                                                {"role": "user", "content": "hi"}]}, 8)[0]
    assert [m["role"] for m in messages] == ["system", "user"]


def test_server_close_ends_keep_alive_connections_and_joins_their_threads(chatty_run):
    # a client that keeps its HTTP/1.1 connection open must not leave a handler thread (holding the model) behind:
    # one that outlives the interpreter frees tensors during finalization and aborts the process
    import http.client

    srv = make_server(load_model(chatty_run["run"], device="cpu"), "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    before = set(threading.enumerate())
    conn = http.client.HTTPConnection("127.0.0.1", srv.server_address[1], timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().read() and conn.sock is not None  # the connection stays open
    handlers = [th for th in threading.enumerate() if th not in before]
    assert handlers and all(not th.daemon for th in handlers)
    srv.shutdown()
    srv.server_close()
    t.join(timeout=10)
    assert not any(th.is_alive() for th in handlers)
    conn.close()


def test_run_serve_binds_then_loads_the_model_and_names_it(tiny_run, monkeypatch, capsys):
    # the port is bound before the model loads (so a busy one is reported first); the server gets the model after
    from fastchat_ft.cli import main
    from fastchat_ft.serve import ChatServer
    served = []

    def stop_at_once(self, *a, **k):
        served.append((self.loaded, self.model_name))
        raise KeyboardInterrupt
    monkeypatch.setattr(ChatServer, "serve_forever", stop_at_once)
    assert main(["serve", str(tiny_run["run"]), "--backend", "transformers", "--port", "0"]) == 0
    assert served and served[0][0] is not None and served[0][1] == "run"
    assert "as 'run' on http://127.0.0.1:" in capsys.readouterr().err


@pytest.mark.parametrize("field, value", [("seed", "7"), ("seed", 1.5), ("seed", 2**70), ("seed", -1), ("seed", True),
                                          ("stream", "false"), ("stream", 1)])
def test_seed_and_stream_of_the_wrong_type_are_a_400(field, value):
    # a string/float/2**70 seed dropped the connection (manual_seed raised in the handler); "stream": "false" streamed
    from fastchat_ft.serve import RequestError, parse_chat_request
    with pytest.raises(RequestError, match=field) as err:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], field: value}, 8)
    assert err.value.param == field and err.value.status == 400


def test_good_seed_and_stream_values_pass():
    from fastchat_ft.serve import parse_chat_request
    _, opts, stream = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "seed": 2**63 - 1,
                                          "stream": False}, 8)
    assert opts["seed"] == 2**63 - 1 and stream is False
    _, opts, stream = parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "seed": None}, 8)
    assert opts["seed"] is None and stream is False


@pytest.mark.parametrize("content", [["hi"], [{"type": "image_url", "image_url": {"url": "data:,"}}],
                                     [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {}}],
                                     [{"type": "text", "text": 3}]])
def test_content_parts_that_are_not_text_are_a_400_not_an_empty_message(content):
    from fastchat_ft.serve import RequestError, parse_chat_request
    with pytest.raises(RequestError, match=r"messages\[1\]\.content\[\d\]") as err:
        parse_chat_request({"messages": [{"role": "system", "content": "x"}, {"role": "user", "content": content}]}, 8)
    assert err.value.param == "messages[1].content" and err.value.status == 400


def test_text_parts_are_joined():
    from fastchat_ft.serve import parse_chat_request
    parts = [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]
    assert parse_chat_request({"messages": [{"role": "user", "content": parts}]}, 8)[0][0]["content"] == "ab"


def test_max_tokens_beyond_the_context_is_a_400_and_the_default_is_cut_to_fit():
    from types import SimpleNamespace

    from fastchat_ft.serve import RequestError, fit_to_context
    chat = SimpleNamespace(prompt_tokens=100, max_new_tokens=10**8)
    with pytest.raises(RequestError, match="at most 412") as err:
        fit_to_context({"max_tokens": 10**8}, chat, 512)
    assert err.value.param == "max_tokens" and err.value.status == 400
    chat.max_new_tokens = 412
    fit_to_context({"max_tokens": 412}, chat, 512)  # exactly fits
    chat.max_new_tokens = 512  # the server's default, not asked for: cut to the room left
    fit_to_context({}, chat, 512)
    assert chat.max_new_tokens == 412
    with pytest.raises(RequestError) as err:
        fit_to_context({}, SimpleNamespace(prompt_tokens=600, max_new_tokens=8), 512)
    assert err.value.param == "messages"
    fit_to_context({"max_tokens": 10**8}, chat, None)  # no known context: nothing to check


def test_max_tokens_beyond_the_context_over_http(server, client):
    # one request for 10**8 tokens used to hold the one-at-a-time server until it was killed
    import openai
    with pytest.raises(openai.BadRequestError, match="max_tokens") as err:
        client.chat.completions.create(model="x", messages=MSGS, max_tokens=10**8)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError, match="stream"):
        client.chat.completions.create(model="x", messages=MSGS, max_tokens=3, extra_body={"stream": "false"})
    r = client.chat.completions.create(model="x", messages=MSGS, max_tokens=3, temperature=0.5, seed=2**63 - 1)
    assert r.usage.completion_tokens <= 3


def test_stop_sequences_end_the_reply_before_them_streamed_and_not(server, client):
    # `stop` was ignored: the reply ran on past it to max_tokens with finish_reason "length"
    full = ChatStream(server.loaded.model, server.loaded.tokenizer, MSGS, max_new_tokens=12)
    full.run()
    stop = full.text[len(full.text) // 2: len(full.text) // 2 + 4]
    cut = full.text.index(stop)
    assert 0 < cut
    r = client.chat.completions.create(model="x", messages=MSGS, max_tokens=12, temperature=0, stop=[stop, "@@"])
    assert r.choices[0].message.content == full.text[:cut] and r.choices[0].finish_reason == "stop"
    assert r.usage.completion_tokens < 12
    chunks = list(client.chat.completions.create(model="x", messages=MSGS, max_tokens=12, temperature=0, stop=stop,
                                                 stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == full.text[:cut]
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]


@pytest.mark.parametrize("value", [7, ["a", 3], ["a", "b", "c", "d", "e"]])
def test_stop_of_the_wrong_shape_is_a_400(value):
    from fastchat_ft.serve import RequestError, parse_chat_request
    with pytest.raises(RequestError, match="stop") as err:
        parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "stop": value}, 8)
    assert err.value.param == "stop" and err.value.status == 400
    assert parse_chat_request({"messages": [{"role": "user", "content": "hi"}], "stop": "x"}, 8)[1]["stop"] == ["x"]


def test_a_conversation_the_chat_template_refuses_is_a_400_not_a_dropped_connection(tiny_run):
    # Mistral/Llama-2/Gemma templates raise on some message orders (two user turns in a row, a system turn); the
    # TemplateError escaped the handler, the connection dropped and the client saw only a network error
    openai = pytest.importorskip("openai")
    loaded = load_model(tiny_run["run"], device="cpu")
    loaded.tokenizer.chat_template = (
        "{% for m in messages %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    srv = make_server(loaded, "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{srv.server_address[1]}/v1", api_key="unused",
                               timeout=60, max_retries=0)
        two_users = [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]
        for stream in (False, True):
            with pytest.raises(openai.BadRequestError, match="roles must alternate") as err:
                client.chat.completions.create(model="x", messages=two_users, max_tokens=3, stream=stream)
            assert err.value.body["param"] == "messages"
        r = client.chat.completions.create(model="x", messages=two_users[:1], max_tokens=3, temperature=0)
        assert r.choices[0].finish_reason == "stop"  # the server still answers
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)


@pytest.mark.parametrize("headers, body", [
    (b"Content-Length: abc\r\n", b"{}"),
    (b"Transfer-Encoding: chunked\r\n", b"3\r\n{}\n\r\n0\r\n\r\n")])
def test_a_body_without_a_usable_length_is_an_error_json_and_the_connection_closes(tiny_run, headers, body):
    # Content-Length "abc" raised in the handler (dropped connection, traceback on stderr); a chunked body was left
    # unread on the keep-alive connection and its bytes were parsed as the next request
    import json
    import socket

    srv = make_server(load_model(tiny_run["run"], device="cpu"), "127.0.0.1", 0)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        with socket.create_connection(srv.server_address[:2], timeout=30) as s:
            s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" + headers
                      + b"\r\n" + body)
            reply = b""
            while chunk := s.recv(4096):  # the server closes the connection after its answer
                reply += chunk
        head, _, payload = reply.partition(b"\r\n\r\n")
        assert head.split()[1] in (b"400", b"411") and reply.count(b"HTTP/1.1") == 1
        assert json.loads(payload)["error"]["type"] == "invalid_request_error"
    finally:
        srv.shutdown()
        srv.server_close()
        t.join(timeout=10)


def test_a_body_that_is_not_utf8_is_a_400(server):
    # json.loads raised UnicodeDecodeError (not a JSONDecodeError) inside the handler: a dropped connection
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=30)
    conn.request("POST", "/v1/chat/completions", body=b'{"messages": "\xff"}',
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 400 and "UTF-8" in json.loads(r.read())["error"]["message"]
    conn.close()


@pytest.mark.parametrize("r, rank_pattern, expected", [(4, None, 8), (16, None, 16), (32, None, 32),
                                                      (16, {"q_proj": 40}, 64)])
def test_vllm_command_allows_the_adapters_rank(tiny_run, tmp_path, r, rank_pattern, expected):
    # vLLM's --max-lora-rank defaults to 16 and takes only 8, 16, 32, 64, ...: a rank-32 run failed to start
    import json
    import shutil
    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_run["run"] / "final", ckpt)
    conf = json.loads((ckpt / "adapter_config.json").read_text())
    conf.update(r=r, rank_pattern=rank_pattern or {})
    (ckpt / "adapter_config.json").write_text(json.dumps(conf))
    cmd = vllm_command(str(ckpt), "127.0.0.1", 8123)
    assert cmd[cmd.index("--max-lora-rank") + 1] == str(expected)


def test_vllm_serves_a_model_folder_under_the_name_the_transformers_backend_uses(tiny_run):
    # vLLM names a model by its --model path by default: the README's request for "demo" got a 404 from vLLM
    cmd = vllm_command(str(tiny_run["base"]), "127.0.0.1", 8123)
    assert cmd[cmd.index("--served-model-name") + 1] == tiny_run["base"].name


def test_vllm_command_refuses_a_checkpoint_with_whole_tensors_and_names_the_export(tiny_run_new_tokens, tmp_path):
    # vLLM refuses an adapter holding whole tensors (a resized vocabulary) only after loading the base on the GPU
    from fastchat_ft.errors import FastchatError
    from fastchat_ft.export import write_adapter
    from fastchat_ft.inference import load_tokenizer, resolve_model
    with pytest.raises(FastchatError, match="--adapter") as err:
        vllm_command(str(tiny_run_new_tokens["run"]), "127.0.0.1", 8123)
    assert "embed_tokens" in str(err.value)
    source = resolve_model(tiny_run_new_tokens["run"])  # the export the error names is served
    write_adapter(source.path, source.base, load_tokenizer(source.tokenizer_dir), tmp_path)
    cmd = vllm_command(str(tmp_path), "127.0.0.1", 8123)
    assert cmd[cmd.index("--model") + 1] == str((tmp_path / "base").resolve())
