"""Admission of one request, and its end.

`Gate.enter` applies the caller's rate limits (RPM, and TPM reserving the prompt plus
`max_tokens`: `limits.py`), then waits for the request's priority class's turn when the
gateway is saturated (`priority.py`), and tags the body with vLLM's `priority` when asked to.
It raises ApiError 429 (or 503 while Redis is down and the policy is closed) with
`Retry-After` and OpenAI's six `x-ratelimit-*` headers; an admitted request carries the same
headers. `Gate.leave` ends it exactly once: the slot goes back, and the TPM reservation is
settled to the real usage (or released when the request never ran), in the background so
that a client gone mid-stream still settles.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kvtier.gateway.errors import ApiError
from kvtier.gateway.limits import Admitted, Limiter, Refused
from kvtier.gateway.limits_config import LimitsConfig
from kvtier.gateway.priority import AdmissionQueue, QueueFull, Ticket, request_class, vllm_priority
from kvtier.gateway.tokens import byte_prompts

DEFAULT_MAX_TOKENS = 256  # reserved for a request that does not say max_tokens


@dataclass
class Pass:
    """An admitted request: what to give back when it ends, and the headers to answer with."""

    admitted: Admitted | None
    ticket: Ticket | None
    headers: dict[str, str]
    open: bool = True


@dataclass
class Gate:
    config: LimitsConfig | None = None
    limiter: Limiter | None = None
    queue: AdmissionQueue | None = None
    send_priority: bool = False
    # a request's prompts in tokens: 4 bytes a token, or the model's tokenizer (--tokenizer)
    prompts: Callable[[dict[str, Any]], Awaitable[list[np.ndarray]]] = byte_prompts
    _pending: set[asyncio.Task[None]] = field(default_factory=set)

    async def enter(
        self,
        tenant: str,
        key: str | None,
        body: dict[str, Any],
        priority_header: str | None,
        prompts: list[np.ndarray],
    ) -> Pass:
        """Admits a request (`prompts`: its body's, as `count` gives them) within its limits
        and its class's share, or raises 429."""
        admitted = await self._admit(tenant, key, body, prompts)
        headers = admitted.headers.as_dict() if admitted else {}
        ticket = None
        if self.config is not None:
            cls = request_class(self.config, tenant, key, priority_header)
            if self.send_priority:
                body["priority"] = vllm_priority(cls)
            ticket = await self._turn(cls.name, admitted, headers)
        return Pass(admitted, ticket, headers)

    async def admit_only(self, tenant: str, key: str | None, body: dict[str, Any]) -> None:
        """Limits for work that runs elsewhere (the durable queue): its reservation stands
        for the window, as its usage is never seen here."""
        await self._admit(tenant, key, body)

    async def count(self, body: dict[str, Any]) -> list[np.ndarray]:
        """A request's prompts in tokens; raises 400 for prompts that are not well formed."""
        try:
            return await self.prompts(body)
        except ValueError as exc:
            param = "messages" if "messages" in body else "prompt"
            raise ApiError(400, str(exc), param=param) from exc

    async def _admit(
        self,
        tenant: str,
        key: str | None,
        body: dict[str, Any],
        prompts: list[np.ndarray] | None = None,
    ) -> Admitted | None:
        if self.limiter is None:
            return None
        if prompts is None:
            prompts = await self.count(body)
        prompt = sum(len(p) for p in prompts)
        wanted = body.get("max_tokens") or body.get("max_completion_tokens")
        wanted = wanted if isinstance(wanted, int) and wanted > 0 else DEFAULT_MAX_TOKENS
        wanted *= len(prompts)  # each prompt of a batch gets its own answer
        decision = await self.limiter.admit(tenant, key, prompt, wanted)
        if isinstance(decision, Refused):
            raise _refusal(decision)
        return decision

    async def _turn(
        self, class_name: str, admitted: Admitted | None, headers: Mapping[str, str]
    ) -> Ticket | None:
        if self.queue is None:
            return None
        try:
            return await self.queue.acquire(class_name)
        except QueueFull as exc:
            self._settle(admitted, None)
            raise ApiError(
                429, str(exc), code="rate_limit_exceeded", headers=dict(headers)
            ) from exc
        except BaseException:
            self._settle(admitted, None)
            raise

    def leave(self, entry: Pass, usage: Mapping[str, Any] | None) -> None:
        """Ends a request (idempotent): its slot back, its tokens settled to `usage`."""
        if not entry.open:
            return
        entry.open = False
        if entry.ticket is not None and self.queue is not None:
            self.queue.release(entry.ticket)
        total = usage.get("total_tokens") if usage else None
        self._settle(entry.admitted, total if isinstance(total, int) else None)

    def _settle(self, admitted: Admitted | None, used_tokens: int | None) -> None:
        if admitted is None or self.limiter is None:
            return
        if used_tokens is None:
            work = self.limiter.release(admitted)
        else:
            work = self.limiter.settle(admitted, used_tokens)
        try:
            task = asyncio.get_running_loop().create_task(work)
        except RuntimeError:  # no loop (interpreter shutdown): the window expires it
            work.close()
            return
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)


def _refusal(refused: Refused) -> ApiError:
    headers = refused.headers.as_dict()
    if not refused.never:
        headers["Retry-After"] = str(refused.retry_after_s)
    code = "rate_limit_exceeded" if refused.status == 429 else None
    return ApiError(refused.status, refused.message, code=code, headers=headers)
