"""What one app instance holds: its settings, the engine, metrics and in-flight requests (no globals)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from starlette.requests import Request

from batchlm.engine.client import EngineClient, ServedModel
from batchlm.server.allowed_hosts import AllowedHosts
from batchlm.server.errors import APIError
from batchlm.server.generation import InFlight
from batchlm.server.http_protocol import DEFAULT_KEEP_ALIVE_TIMEOUT_S, DEFAULT_MAX_HEADER_BYTES
from batchlm.server.metrics import ServerMetrics
from batchlm.server.protocol import SamplingFields
from batchlm.server.response_store import ResponseStore

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
# As nginx's client_body_timeout: long enough for any client that is still sending.
DEFAULT_BODY_TIMEOUT_S = 60.0
# As nginx's client_header_timeout.
DEFAULT_HEADER_TIMEOUT_S = 60.0
# The seed README's examples send these; they name the one served model.
PLACEHOLDER_MODEL_NAMES = ("default", "default_model")


@dataclass(frozen=True)
class ServerSettings:
    """HTTP-side settings of `batchlm serve` (the engine's live in EngineConfig)."""

    # Address to bind ("0.0.0.0", or "" for every interface of every address family).
    host: str = "127.0.0.1"
    # TCP port to listen on; 0 takes a free one the system picks (logged at start).
    port: int = 8080
    # The path a reverse proxy serves the server under (e.g. /llm for https://host/llm/), as uvicorn's
    # and vLLM's --root-path: requests are served whether the proxy strips it or passes it on, and
    # the chat page and /docs name their files and the API under it. "" serves at the root.
    root_path: str = ""
    # Host names the server answers to, comma-separated ("*.example.com": every name under it; "*": any
    # host); a request whose Host header names another is refused 403, as is one a browser sends for a
    # page on another host (its Origin). This stops DNS rebinding (a web page re-pointing its own name
    # at this machine to call the server from your browser and read the answers) and other sites'
    # pages sending requests from your browser. localhost, *.localhost, loopback addresses and --host itself are always answered; None
    # (left unset): only those while --host listens on loopback only, any host where it listens on
    # other interfaces.
    allowed_hosts: AllowedHosts | None = None
    # Bearer key required on /v1/*, /tokenize, /detokenize and /tokenizer_info (/health, /metrics,
    # /version, the chat page's files and the API docs stay open); None (left unset) leaves them open.
    api_key: str | None = None
    # Waiting requests beyond which new ones are refused with 429; None (`none` on the command line) = no
    # limit.
    max_queue: int | None = 1024
    # Largest `n` (completions per prompt) a request may ask for (400 beyond). Each completion takes one
    # of the --batch-size running slots; kept below it, one request cannot fill the batch alone.
    max_n: int = 16
    # Largest accepted request body, in bytes (413 beyond).
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    # Seconds a request body may go without any of it arriving before the request is answered 408
    # (a client that sends its headers and then stalls would otherwise hold its request forever).
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S
    # Seconds a connection gets to send a request's headers in full, from its opening or the first byte
    # of the request; then it is closed (connections that send nothing, or their headers a byte at a
    # time, would otherwise stay open for ever, each holding a file descriptor).
    header_timeout_s: float = DEFAULT_HEADER_TIMEOUT_S
    # Largest accepted request line and headers together, in bytes (431 beyond).
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES
    # Seconds an idle keep-alive connection stays open between requests (behind a load balancer, more
    # than the balancer's own idle timeout, so that it never reuses a connection as the server closes it).
    keep_alive_timeout_s: float = DEFAULT_KEEP_ALIVE_TIMEOUT_S
    # Open client connections beyond which a new one is answered 503 and closed, with a warning in the
    # log; None (left unset) = the open-file limit less a reserve, so that files still open under a
    # flood of connections (past the limit they would be dropped unanswered, unlogged).
    max_connections: int | None = None
    # Seconds in-flight requests get to finish after SIGINT/SIGTERM/SIGHUP before they are aborted.
    shutdown_timeout_s: float = 30.0
    # Seconds between the periodic stats log lines (written only while there is activity).
    stats_log_interval_s: float = 10.0
    # HTTP server processes sharing the one engine (Linux, torch backend): each takes a share of the
    # connections on the same port, so hundreds of concurrent streams are not bound by one Python
    # event loop. None = automatic: 2 when the engine runs on an NVIDIA GPU and there are at least 8
    # CPUs, else 1.
    api_servers: int | None = None
    # The model's tool-call markup: read from its output under tool_choice "auto", and written in it
    # under a forced tool_choice. "auto" follows the model's chat template (Hermes/Qwen <tool_call>,
    # Qwen3-Coder <function=...>, Seed-OSS <seed:tool_call>, Mistral [TOOL_CALLS], Granite 3.x
    # <|tool_call|>, Llama 3 JSON; Hermes when it teaches none), or one family by name; "none" refuses
    # tool_choice "auto" and forces calls as plain JSON.
    tool_call_parser: str = "auto"
    # How a reasoning model's thinking is read from its output into `reasoning_content`: "auto" reads
    # it where the chat template closes thinking blocks (`</think>`: Qwen3, DeepSeek-R1, SmolLM3;
    # `[/THINK]`: Magistral; `</seed:think>`: Seed-OSS), or markers by name ("think", also as vLLM's
    # "qwen3" and "deepseek_r1"; "mistral"; "seed_oss"); "none" leaves it in the content. A constraint
    # (response_format, structured_outputs, a forced tool call) then holds from the end of the thinking
    # on.
    reasoning_parser: str = "auto"
    # Engine backend: "auto" (MLX on Apple Silicon when mlx-lm is installed, else PyTorch), "torch" or "mlx".
    backend: str = "auto"
    # Log level: DEBUG adds one line per request and the access log.
    log_level: str = "INFO"
    # The built-in web chat page at / (a static page that talks to /v1/chat/completions); the API
    # stays as it is without it. Behind a proxy serving it under a path, see --root-path.
    ui: bool = True
    # Responses of /v1/responses kept for `previous_response_id` and GET /v1/responses/{id} (`store`,
    # true unless the request says false); beyond, the conversations continued least recently are
    # removed whole (never the one continued last); 0 keeps none.
    stored_responses: int = 1000
    # Directory of the stored responses' database (their conversations, in clear); None: a private
    # temporary one, removed when the server stops.
    responses_dir: str | None = None


@dataclass
class ServerState:
    engine: EngineClient
    settings: ServerSettings
    metrics: ServerMetrics
    in_flight: InFlight
    # Set when a graceful shutdown starts: /health turns 503 so balancers stop sending work.
    shutting_down: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))
    # Set while the other API-server processes start: /health says "loading" until all of them serve.
    starting_api_servers: bool = False
    # Stored responses of /v1/responses; None with --stored-responses 0.
    responses: ResponseStore | None = None

    def ready_model(self, requested: str | None = None) -> ServedModel:
        """The served model's info, or 503 while the engine is loading, after it died, or once a
        graceful shutdown has begun (new requests are refused while the others drain); 404 unless
        `requested` names the served model or one of its aliases (None: the served one)."""
        if self.shutting_down:
            raise APIError(
                503,
                "The server is shutting down and takes no new requests; retry shortly.",
                code="shutting_down",
            )
        if self.engine.is_dead:
            raise APIError(
                503, "The engine has stopped and cannot serve requests.", code="engine_unavailable"
            )
        if not self.engine.is_ready:
            raise APIError(503, "The model is still loading; retry shortly.", code="model_loading")
        info = self.engine.model_info
        names = (info.served_model_name, *info.aliases, *PLACEHOLDER_MODEL_NAMES)
        if requested is not None and requested not in names:
            raise APIError(
                404,
                f"The model '{requested}' does not exist. This server serves '{info.served_model_name}'.",
                param="model",
                code="model_not_found",
            )
        return info

    def admit(self, body: SamplingFields) -> ServedModel:
        """ready_model(), for a generation request that names the served model and an allowed n."""
        info = self.ready_model(body.model)
        max_n = self.settings.max_n
        if body.n > max_n:  # SamplingParams checks the lower bound
            raise APIError(
                400, f"'n' must be at most {max_n} on this server (--max-n), got {body.n}.", param="n"
            )
        return info


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.batchlm
    return state
