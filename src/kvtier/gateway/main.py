"""`kvtier gateway`: the OpenAI-compatible gateway in front of inference workers."""

from __future__ import annotations

import argparse
import socket
import sys

import uvicorn

from kvtier.config import env_default, is_loopback
from kvtier.errors import ConfigError
from kvtier.gateway.affinity import AffinityStore, MemoryAffinities, RedisAffinities
from kvtier.gateway.app import create_app
from kvtier.gateway.costs import Priors
from kvtier.gateway.gate import Gate
from kvtier.gateway.gateway import Gateway, Settings
from kvtier.gateway.limits import Limiter
from kvtier.gateway.limits_config import LimitsConfig, load_limits
from kvtier.gateway.limits_memory import MemoryLimiter
from kvtier.gateway.limits_redis import RedisLimiter
from kvtier.gateway.metrics import GatewayMetrics
from kvtier.gateway.pool import Pool
from kvtier.gateway.priority import AdmissionQueue
from kvtier.gateway.routing import POLICIES, make_policy
from kvtier.gateway.sessions import MemoryResponseStore, RedisResponseStore, ResponseStore
from kvtier.gateway.taskqueue import TaskQueue
from kvtier.server.auth import Auth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    arg = parser.add_argument
    arg("--host", default=env_default("KVTIER_GATEWAY_HOST", "127.0.0.1"))
    arg("--port", type=int, default=env_default("KVTIER_GATEWAY_PORT", "8000"),
        help="0: any free port")  # fmt: skip
    arg("--workers", default=env_default("KVTIER_WORKERS"),
        help="comma-separated base URLs of OpenAI-compatible workers (vLLM servers)")  # fmt: skip
    arg("--kv-events", default=env_default("KVTIER_KV_EVENTS"),
        help="comma-separated ZeroMQ endpoints of the workers' KV events, one per worker in "
        "the order of --workers (empty for a worker without); without them the gateway "
        "indexes its own routing decisions")  # fmt: skip
    arg("--kv-events-replay", default=env_default("KVTIER_KV_EVENTS_REPLAY"),
        help="comma-separated replay endpoints of those events (vLLM's replay_endpoint), in "
        "the same order: the gateway first reads the batches each worker still holds, and "
        "those it missed")  # fmt: skip
    arg("--redis", default=env_default("KVTIER_REDIS"),
        help="redis://… for sessions and affinities shared by gateway replicas")  # fmt: skip
    arg("--auth-file", default=env_default("KVTIER_AUTH_FILE"), help="lines 'tenant key'")
    arg("--policy", choices=sorted(POLICIES), default=env_default("KVTIER_POLICY", "kvtier"))
    arg("--tokenizer", default=env_default("KVTIER_TOKENIZER"),
        help="the model's tokenizer directory: count prompts in its tokens, so that a real "
        "vLLM's KV events match chats (default: 4 UTF-8 bytes a token)")  # fmt: skip
    arg("--block-tokens", type=int, default=env_default("KVTIER_BLOCK_TOKENS", "16"),
        help="the workers' KV block size in tokens")  # fmt: skip
    arg("--worker-cache-tokens", type=int,
        default=env_default("KVTIER_WORKER_CACHE_TOKENS", "1048576"),
        help="tokens the index keeps per worker and tier (about its KV cache)")  # fmt: skip
    arg("--prefill-ms-per-token", type=float,
        default=env_default("KVTIER_PREFILL_MS_PER_TOKEN", "0.1"),
        help="a worker's compute time per prompt token until its /metrics tell")  # fmt: skip
    arg("--session-ttl", type=int, default=env_default("KVTIER_SESSION_TTL", str(30 * 86400)),
        help="seconds a stored response lives")  # fmt: skip
    arg("--salt-secret", default=env_default("KVTIER_SALT_SECRET", ""),
        help="key of the hash that turns a tenant into its cache_salt")  # fmt: skip
    arg("--worker-api-key", default=env_default("KVTIER_WORKER_API_KEY", ""),
        help="sent to every worker as `Authorization: Bearer KEY` (vLLM's --api-key)")  # fmt: skip
    arg("--stall-timeout", type=float, default=env_default("KVTIER_STALL_TIMEOUT", "60"),
        help="seconds a started stream may go silent before the client gets an error "
        "(a hung worker)")  # fmt: skip
    arg("--max-body", type=int, default=env_default("KVTIER_MAX_BODY", str(16 << 20)),
        help="largest request body in bytes")  # fmt: skip
    arg("--limits", default=env_default("KVTIER_LIMITS"),
        help="TOML file of rpm/tpm/class per tenant and API key, and class shares")  # fmt: skip
    arg("--max-inflight", type=int, default=env_default("KVTIER_MAX_INFLIGHT", "0"),
        help="in-flight requests past which new ones wait, by class share (0: off)")  # fmt: skip
    arg("--max-queued", type=int, default=env_default("KVTIER_MAX_QUEUED", "1024"),
        help="requests that may wait at saturation (each class its share); more: 429")  # fmt: skip
    arg("--vllm-priority", action="store_true",
        default=env_default("KVTIER_VLLM_PRIORITY", "") in ("1", "true", "yes"),
        help="send each request's class as vLLM's `priority` (vLLM with "
        "--scheduling-policy priority)")  # fmt: skip
    arg("--insecure", action="store_true",
        default=env_default("KVTIER_INSECURE", "") in ("1", "true", "yes"),
        help="allow a non-loopback address without an auth file")  # fmt: skip


def build(args: argparse.Namespace) -> Gateway:
    """A gateway from parsed options; raises ConfigError on a bad combination."""
    urls = [u.strip() for u in (args.workers or "").split(",") if u.strip()]
    if not urls:
        raise ConfigError("give the workers: --workers http://host:port,… (or KVTIER_WORKERS)")
    endpoints = _per_worker(args.kv_events, urls, "--kv-events")
    replays = _per_worker(args.kv_events_replay, urls, "--kv-events-replay")
    if replays and not endpoints:
        raise ConfigError("--kv-events-replay needs --kv-events")
    if args.block_tokens < 1 or args.worker_cache_tokens < args.block_tokens:
        raise ConfigError("--block-tokens must be >= 1 and --worker-cache-tokens >= it")
    if args.session_ttl < 1 or args.stall_timeout <= 0:
        raise ConfigError("--session-ttl and --stall-timeout must be positive")
    if not args.auth_file and not is_loopback(args.host) and not args.insecure:
        raise ConfigError("a non-loopback gateway needs --auth-file (or --insecure)")
    auth = Auth.from_file(args.auth_file) if args.auth_file else Auth()
    priors = Priors(compute_s_per_token=args.prefill_ms_per_token / 1000)
    capacity = args.worker_cache_tokens // args.block_tokens
    policy = make_policy(args.policy)
    pool = Pool(urls, policy, args.block_tokens, capacity, endpoints, priors, replays)
    affinities: AffinityStore
    responses: ResponseStore
    if args.redis:
        affinities, responses = RedisAffinities(args.redis), RedisResponseStore(args.redis)
    else:
        affinities, responses = MemoryAffinities(), MemoryResponseStore()
    settings = Settings(
        block_tokens=args.block_tokens,
        session_ttl_s=args.session_ttl,
        max_body_bytes=args.max_body,
        salt_secret=args.salt_secret,
        stall_timeout_s=args.stall_timeout,
        worker_api_key=args.worker_api_key,
    )
    gateway = Gateway(pool, auth, affinities, responses, GatewayMetrics(), settings)
    gateway.gate = _gate(args)
    if args.tokenizer:
        try:
            from kvtier.gateway.tokenizer import ModelTokenizer
        except ImportError as exc:
            raise ConfigError(f"--tokenizer needs transformers ({exc})") from exc
        gateway.gate.prompts = ModelTokenizer(args.tokenizer).in_thread
    gateway.tasks = TaskQueue(args.redis) if args.redis else None
    return gateway


def _per_worker(option: str | None, urls: list[str], name: str) -> list[str | None] | None:
    """A comma-separated option with one entry per worker (empty for none)."""
    if not option:
        return None
    entries = [e.strip() or None for e in option.split(",")]
    if len(entries) != len(urls):
        raise ConfigError(f"{name} needs one endpoint per worker (empty for none)")
    return entries


def _gate(args: argparse.Namespace) -> Gate:
    """Limits and the admission queue from --limits, --max-inflight and --max-queued."""
    if args.max_inflight < 0 or args.max_queued < 0:
        raise ConfigError("--max-inflight and --max-queued must not be negative")
    config = load_limits(args.limits) if args.limits else None
    limiter: Limiter | None = None
    if config is not None:
        limiter = RedisLimiter(args.redis, config) if args.redis else MemoryLimiter(config)
    classes = config.classes if config is not None else LimitsConfig({}, {}).classes
    queue = (
        AdmissionQueue(args.max_inflight, classes, args.max_queued) if args.max_inflight else None
    )
    config = config if config is not None else (LimitsConfig({}, {}) if queue else None)
    return Gate(config, limiter, queue, args.vllm_priority)


def run(args: argparse.Namespace) -> int:
    try:
        gateway = build(args)
    except (ConfigError, ValueError) as exc:
        print(f"kvtier gateway: {exc}", file=sys.stderr)
        return 2
    sock = socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it: without it a small answer waits for the client's delayed
    # ACK (about 40 ms a request, measured), as the event loop does not set it on them here.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    host, port = sock.getsockname()[:2]
    config = uvicorn.Config(
        create_app(gateway), loop="uvloop", http="httptools", log_level="warning",
        access_log=False, timeout_graceful_shutdown=5, backlog=2048,
    )  # fmt: skip
    print(f"kvtier gateway: http://{host}:{port} policy {args.policy}", flush=True)
    uvicorn.Server(config).run(sockets=[sock])  # on `loop`: asyncio.run(serve()) ignores it
    return 0
