"""`fastchat-ft serve`: an OpenAI-compatible endpoint for a quick try. vLLM's own server when vLLM is
installed; otherwise a small `/v1/chat/completions` server (streaming via server-sent events too) on
transformers, for local testing only: one request at a time, bound to 127.0.0.1 unless told otherwise.

The fallback uses the standard library's HTTP server on purpose: no web framework dependency for a
testing aid, and the OpenAI wire format is a few JSON shapes.
"""
from __future__ import annotations

import errno
import json
import os
import socket
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from fastchat_ft import flags
from fastchat_ft.errors import ConfigError, FastchatError, ModelError
from fastchat_ft.inference import (ChatStream, LoadedModel, load_model, read_adapter_config, resolve_model,
                                   sampling_problem)

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MAX_BODY = 8 * 1024 * 1024


def run_serve(args) -> int:
    check_serve_args(args)
    backend = getattr(args, "backend", "auto")
    if backend == "vllm" or (backend == "auto" and _has_vllm()):
        return _exec_vllm(args)
    # bound before the model loads: a busy port or a wrong --host is reported without waiting for the weights
    server = make_server(None, args.host, args.port, default_max_tokens=getattr(args, "max_new_tokens", 512))
    if args.host not in LOOPBACK:
        print(f"warning: serving on {args.host}: this server is for local testing (no auth, one request at a "
              "time)", file=sys.stderr)
    print(f"loading {args.model}; requests wait until it is served", file=sys.stderr)
    try:
        server.loaded = loaded = load_model(args.model, trust_remote_code=getattr(args, "trust_remote_code", False))
    except BaseException:
        server.server_close()
        raise
    host, port = server.server_address[:2]
    url_host = f"[{host}]" if ":" in host else host
    print(f"serving {loaded.source.describe()} as {server.model_name!r} on http://{url_host}:{port}/v1 "
          "(transformers backend; Ctrl-C stops)", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


def check_serve_args(args) -> None:
    """Flag values the server cannot start or answer with, refused before any model loads."""
    # a negative default would answer every request that sends no max_tokens with a 400 about a field it never sent
    flags.at_least(args, {"max_new_tokens": 1})
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"port {args.port} is not a TCP port (0 to 65535)", field="--port",
                          fix="pass a --port from 1024 to 65535 (0: any free port)")


def _has_vllm() -> bool:
    import importlib.util
    return importlib.util.find_spec("vllm") is not None


def vllm_command(model: str, host: str, port: int) -> list[str]:
    """vLLM's OpenAI server for a model folder; for a LoRA checkpoint, the base plus the adapter, with the
    checkpoint's tokenizer and its stop tokens (an export's generation_config.json when present)."""
    source = resolve_model(model)
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--host", host, "--port", str(port)]
    if source.kind == "lora":
        _check_vllm_adapter(source.path)
        cmd += ["--model", str(source.base), "--enable-lora", "--lora-modules", f"finetuned={source.path}",
                "--max-lora-rank", str(vllm_max_lora_rank(read_adapter_config(source.path))),
                "--tokenizer", str(source.tokenizer_dir)]
        if (source.path / "generation_config.json").is_file():
            cmd += ["--generation-config", str(source.path)]
    else:
        # vLLM would name the model by its path; the transformers backend's name (the folder's) keeps requests alike
        cmd += ["--model", str(source.path), "--served-model-name", (source.run_dir or source.path).name or "model"]
    return cmd


def _check_vllm_adapter(ckpt) -> None:
    """vLLM loads lora_A/lora_B only: a checkpoint that also replaces whole tensors (added tokens resized the
    vocabulary, modules_to_save) is refused, but only after the base has loaded on the GPU. Say so now."""
    from safetensors import safe_open

    from fastchat_ft.inference import ADAPTER_WEIGHTS, split_adapter_tensors

    weights = ckpt / ADAPTER_WEIGHTS
    if not weights.is_file():
        return  # vLLM reports what it cannot find; nothing here to check
    with safe_open(str(weights), framework="pt") as f:
        _, full = split_adapter_tensors(dict.fromkeys(f.keys()))
    if full:
        raise ModelError(f"this LoRA checkpoint replaces whole tensors ({', '.join(sorted(full))}), which vLLM does "
                         "not load from an adapter", file=str(ckpt),
                         fix="export it with `fastchat-ft export RUN --out DIR --adapter` (the whole tensors go into "
                             "DIR/base/) and serve DIR, or serve a merged export")


# the values vLLM's --max-lora-rank accepts (its default, 16, refuses a rank-32 or rank-64 adapter at start-up)
VLLM_LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


def vllm_max_lora_rank(conf: dict) -> int:
    rank = max([conf.get("r", 8), *(conf.get("rank_pattern") or {}).values()])
    return next((r for r in VLLM_LORA_RANKS if r >= rank), rank)


def _exec_vllm(args) -> int:
    if not _has_vllm():
        raise FastchatError("--backend vllm needs vLLM installed", field="--backend",
                            fix="pip install vllm (GPU), or use --backend transformers")
    cmd = vllm_command(args.model, args.host, args.port)
    print("running: " + " ".join(cmd), file=sys.stderr)
    os.execv(cmd[0], cmd)
    return 0  # not reached


class ChatServer(ThreadingHTTPServer):
    # server_close() ends every connection and joins its handler thread. A daemon handler left blocked on a
    # keep-alive connection would wake at interpreter exit, drop the last reference to the model and free its
    # tensors during finalization, which aborts the process ("terminate called without an active exception").
    daemon_threads = False
    block_on_close = True

    def __init__(self, address, loaded: LoadedModel | None, default_max_tokens: int = 512):
        # set before binding: when bind fails, super().__init__() calls server_close(), which reads them
        self._open: set = set()  # connections being served, so server_close() can end them
        self._open_lock = threading.Lock()
        if ":" in address[0]:  # an IPv6 literal such as ::1 cannot be bound by an AF_INET socket
            self.address_family = socket.AF_INET6
        super().__init__(address, ChatHandler)
        self.loaded = loaded  # None until run_serve has loaded it (the port is bound first); set before serving
        self.default_max_tokens = default_max_tokens
        self.lock = threading.Lock()  # one generation at a time: a CPU/GPU model is not shared usefully

    @property
    def model_name(self) -> str:
        return (self.loaded.source.run_dir or self.loaded.source.path).name or "model"

    def process_request(self, request, client_address):
        with self._open_lock:
            self._open.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request):
        with self._open_lock:
            self._open.discard(request)
        super().shutdown_request(request)

    def server_close(self):
        with self._open_lock:
            open_now = list(self._open)
        for sock in open_now:  # a handler waiting for the next keep-alive request reads EOF and returns
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().server_close()  # joins the handler threads (a running generation ends at its token limit)


def make_server(loaded: LoadedModel | None, host: str = "127.0.0.1", port: int = 8000, *,
                default_max_tokens: int = 512):
    try:
        return ChatServer((host, port), loaded, default_max_tokens)
    except socket.gaierror as e:  # before OSError: it is one
        raise ConfigError(f"cannot resolve host {host!r} ({e.strerror})", field="--host",
                          fix="pass --host 127.0.0.1 (this machine only) or 0.0.0.0 (every interface)") from None
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ConfigError(f"port {port} on {host} is in use", field="--port",
                              fix="pick another --port, or stop the program that is listening on it") from None
        if e.errno == errno.EACCES:
            raise ConfigError(f"no permission to listen on port {port}", field="--port",
                              fix="pick a --port from 1024 up (lower ones need root)") from None
        raise ConfigError(f"cannot listen on {host}:{port} ({e.strerror})", field="--host",
                          fix="pass --host 127.0.0.1, 0.0.0.0 or an address of this machine") from None


class RequestError(Exception):
    def __init__(self, message: str, status: int = 400, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


class ChatHandler(BaseHTTPRequestHandler):
    server: ChatServer
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):  # one short line per request on stderr
        sys.stderr.write(f"{self.command} {self.path} -> {args[1] if len(args) > 1 else ''}\n")

    def do_GET(self):
        if self.path.rstrip("/") == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": self.server.model_name, "object": "model",
                                                          "created": 0, "owned_by": "fastchat-ft"}]})
        elif self.path.rstrip("/") in ("/health", ""):
            self._json(200, {"status": "ok"})
        else:
            self._error(RequestError(f"no route {self.path}", 404))

    def do_POST(self):
        if self.path.rstrip("/") != "/v1/chat/completions":
            return self._error(RequestError(f"no route {self.path}", 404))
        try:
            req = self._read_json()
            messages, opts, stream = parse_chat_request(req, self.server.default_max_tokens)
        except RequestError as e:
            return self._error(e)
        with self.server.lock:
            try:
                chat = new_chat(self.server.loaded, messages, opts)
                fit_to_context(req, chat, context_length(self.server.loaded.model))
            except RequestError as e:
                return self._error(e)
            if stream:
                self._stream(chat, req)
            else:
                chat.run()
                self._json(200, completion(chat, self.server.model_name))

    def _read_json(self) -> dict:
        # a body left unread (chunked, a bad length, too large) would stay on the keep-alive connection and be
        # parsed as the next request: answer and close the connection instead
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            self.close_connection = True
            raise RequestError("chunked request bodies are not supported: send the body with a Content-Length", 411)
        raw = (self.headers.get("Content-Length") or "0").strip()
        length = int(raw) if raw.isdigit() else -1
        if length <= 0 or length > MAX_BODY:
            self.close_connection = True
            raise RequestError(f"request body missing, too large (over {MAX_BODY} bytes) or with a bad "
                               f"Content-Length ({raw!r})")
        try:
            req = json.loads(self.rfile.read(length))
        except json.JSONDecodeError as e:
            raise RequestError(f"invalid JSON body: {e.msg} at line {e.lineno} column {e.colno}") from None
        except UnicodeDecodeError as e:
            raise RequestError(f"the body is not UTF-8 text: {e.reason} at byte {e.start}") from None
        if not isinstance(req, dict):
            raise RequestError("the body must be a JSON object")
        return req

    def _stream(self, chat: ChatStream, req: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        cid, created, name = f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), self.server.model_name

        def send(delta: dict, finish=None, usage=None):
            chunk = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": name,
                     "choices": [{"index": 0, "delta": delta, "finish_reason": finish}] if usage is None else []}
            if usage is not None:
                chunk["usage"] = usage
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()

        try:
            send({"role": "assistant", "content": ""})
            for piece in chat:
                send({"content": piece})
            send({}, finish=chat.finish_reason)
            if (req.get("stream_options") or {}).get("include_usage"):
                send({}, usage=_usage(chat))
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):  # the client went away: stop generating
            return

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: RequestError) -> None:
        self._json(e.status, {"error": {"message": str(e), "type": "invalid_request_error", "param": e.param,
                                        "code": None}})


# OpenAI's chat roles; "developer" is its newer name for the system message, which chat templates know as "system"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "tool": "tool"}


def parse_chat_request(req: dict, default_max_tokens: int) -> tuple[list[dict], dict, bool]:
    messages = req.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list", param="messages")
    clean = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(f"messages[{i}] needs a 'role'", param=f"messages[{i}]")
        if m["role"] not in ROLES:  # a typo would otherwise render as a turn the model never saw in training
            raise RequestError(f"messages[{i}].role {m['role']!r} is not one of {', '.join(ROLES)}",
                               param=f"messages[{i}].role")
        content = m.get("content") or ""
        if isinstance(content, list):
            content = _text_parts(content, f"messages[{i}].content")
        if not isinstance(content, str):
            raise RequestError(f"messages[{i}].content must be a string or text parts", param=f"messages[{i}]")
        clean.append({"role": ROLES[m["role"]], "content": content})
    if req.get("n", 1) != 1:
        raise RequestError("only n=1 is supported", param="n")
    key = _max_tokens_key(req)
    temperature = req.get("temperature")
    opts = {"max_new_tokens": default_max_tokens if key is None else _positive_int(req[key], key),
            "temperature": 1.0 if temperature is None else _number(temperature, "temperature"),
            "top_p": 1.0 if req.get("top_p") is None else _number(req["top_p"], "top_p"),
            "seed": _seed(req.get("seed")), "stop": _stop(req.get("stop"))}
    problem = sampling_problem(opts["temperature"], opts["top_p"])
    if problem:
        raise RequestError(problem[1], param=problem[0])
    stream = req.get("stream")
    if stream is not None and not isinstance(stream, bool):  # bool("false") is True: it would stream
        raise RequestError("'stream' must be true or false (a JSON boolean)", param="stream")
    return clean, opts, bool(stream)


def _max_tokens_key(req: dict) -> str | None:
    # `is not None`, not `or`: max_tokens 0 is an error to report, not a request for the server's default
    return next((k for k in ("max_completion_tokens", "max_tokens") if req.get(k) is not None), None)


def new_chat(loaded: LoadedModel, messages: list[dict], opts: dict) -> ChatStream:
    """The reply stream; a conversation the model's chat template refuses (Mistral, Llama 2 and Gemma templates
    raise on some role orders) is the client's error to fix, a 400, not an exception that drops the connection."""
    from jinja2.exceptions import TemplateError

    try:
        return ChatStream(loaded.model, loaded.tokenizer, messages, **opts)
    except TemplateError as e:
        raise RequestError(f"the model's chat template refused these messages: {e}", param="messages") from None


def context_length(model) -> int | None:
    return getattr(getattr(model, "config", None), "max_position_embeddings", None)


def fit_to_context(req: dict, chat: ChatStream, context: int | None) -> None:
    """Bound the reply by the model's context, as OpenAI does: a max_tokens that does not fit is a 400 (one
    request for 10**8 tokens would hold this one-at-a-time server until killed); the server's default is cut
    to the room left."""
    if not context:
        return
    room = context - chat.prompt_tokens
    if room <= 0:
        raise RequestError(f"the prompt is {chat.prompt_tokens} tokens; the model's context is {context}",
                           param="messages")
    key = _max_tokens_key(req)
    if key is None:
        chat.max_new_tokens = min(chat.max_new_tokens, room)
    elif chat.max_new_tokens > room:
        raise RequestError(f"'{key}' is {chat.max_new_tokens}, but the model's context is {context} tokens and the "
                           f"prompt takes {chat.prompt_tokens}: at most {room} are left", param=key)


def _text_parts(parts: list, param: str) -> str:
    """OpenAI content parts joined as text. Anything else is refused: the models served here read text only,
    and a dropped part would turn the message into one the user did not send (often an empty one)."""
    for j, p in enumerate(parts):
        if not isinstance(p, dict) or p.get("type") != "text" or not isinstance(p.get("text"), str):
            kind = f"a {p.get('type')!r} part" if isinstance(p, dict) else f"{p!r}"
            raise RequestError(f"{param}[{j}] is {kind}; only {{\"type\": \"text\", \"text\": ...}} parts "
                               "(or a plain string) are supported", param=param)
    return "".join(p["text"] for p in parts)


def _stop(v) -> list[str]:
    # OpenAI's `stop`: a string or up to 4 strings; left unread, a reply ran on past it to max_tokens
    if v is None:
        return []
    stops = [v] if isinstance(v, str) else v
    if not isinstance(stops, list) or len(stops) > 4 or not all(isinstance(s, str) for s in stops):
        raise RequestError(f"'stop' must be a string or a list of up to 4 strings, got {v!r}", param="stop")
    return stops


def _seed(v):
    # torch's Generator.manual_seed takes a 64-bit seed: a string, float or 2**70 raised inside the handler
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < 2**63:
        raise RequestError(f"'seed' must be an integer from 0 to {2**63 - 1}, got {v!r}", param="seed")
    return v


def _number(v, name: str) -> float:
    # float("hot") would raise inside the handler and drop the connection instead of answering 400
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise RequestError(f"'{name}' must be a number", param=name)
    return float(v)


def _positive_int(v, name: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise RequestError(f"'{name}' must be a positive integer", param=name)
    return v


def _usage(chat: ChatStream) -> dict:
    return {"prompt_tokens": chat.prompt_tokens, "completion_tokens": len(chat.token_ids),
            "total_tokens": chat.prompt_tokens + len(chat.token_ids)}


def completion(chat: ChatStream, model_name: str) -> dict:
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": chat.text},
                         "finish_reason": chat.finish_reason, "logprobs": None}],
            "usage": _usage(chat)}
