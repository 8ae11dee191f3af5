"""The connection to a model on a remote ``vllm serve`` deployment: one pooled HTTP client, the start-up
checks, being up or down, the metering of every call, and httpx's transport failures as alignd's errors.

:class:`RemoteVLLMServer` is what :class:`alignd.models.remote_engine.RemoteVLLMEngine` (generation) and
:class:`alignd.models.remote_engine.RemoteVLLMClassifier` (a reward model on the pooling runner) share. A
remote that cannot be reached, or drops the connection, is :class:`alignd.errors.EngineUnavailableError`
(503 ``engine_unavailable``, naming the engine, with Retry-After): the requests that need it fail fast,
the others are untouched, and the next call tries again, so the engine recovers when the remote does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from contextlib import asynccontextmanager

import httpx

from alignd.errors import ConfigurationError, EngineUnavailableError, InvalidRequestError, ServerError
from alignd.models.engine import CallMeter, EngineCallObserver, EngineHealth

# The remote engines' log lines keep the name they have always been logged under.
logger = logging.getLogger("alignd.models.remote_engine")

RETRY_AFTER_S = 5  # what a 503 tells the client while the remote is down
# A down remote is asked again at most this often: in between, calls fail at once with the last reason
# (a blackholed host would otherwise hold each request for the connect timeout).
RECHECK_INTERVAL_S = 1.0


class RemoteVLLMServer:
    """A model on a ``vllm serve`` deployment at ``base_url``: one pooled HTTP client, the start-up checks,
    being up or down, and the metering of every call. :class:`~alignd.models.remote_engine.RemoteVLLMEngine`
    (generation) and :class:`~alignd.models.remote_engine.RemoteVLLMClassifier` (a reward model on the
    pooling runner) build on it.

    It is *up* once the remote passed its checks (:meth:`_verify`), and *down* from the first call that
    could not reach it (or from start, with ``allow_down``). A down remote is checked again (the same
    checks as at start: a remote that came back as another model or tokenizer stays down) on the next
    call or health check, at most once per :data:`RECHECK_INTERVAL_S`; calls in between fail at once
    with the last reason, so a dead remote costs requests nothing but the 503."""

    kind = "remote"
    calls: tuple[str, ...] = ()  # its primitives, by the names its metrics use

    def __init__(
        self,
        name: str,
        base_url: str,
        model: str | None,
        *,
        client: httpx.AsyncClient,
        owns_client: bool = True,
        parent: RemoteVLLMServer | None = None,
    ) -> None:
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model  # None until the first check, when the remote's only model is taken
        self._client = client
        self._owns_client = owns_client
        self._parent = parent  # an adapter view is up and down with the engine it was made from
        self._served_by_parent = False  # an adapter view: the remote was seen to serve its name
        self._meter = CallMeter()  # an adapter view's calls are its engine's: with_adapter shares it
        self._up = False
        self._detail: str | None = "not checked yet"
        self._since = time.time()
        self._next_check = 0.0  # time.monotonic() before which a down remote is not asked again
        self._check_lock = asyncio.Lock()

    @staticmethod
    def http_client(base_url: str, api_key: str | None, timeout_s: float) -> httpx.AsyncClient:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.AsyncClient(
            base_url=base_url.rstrip("/"),
            headers=headers,
            timeout=httpx.Timeout(timeout_s, connect=10.0),
            limits=httpx.Limits(max_connections=256, max_keepalive_connections=64),
        )

    async def _start(self, allow_down: bool) -> None:
        """The first check: a remote that is not what alignd needs raises ConfigurationError; one that
        cannot be reached raises EngineUnavailableError, or with ``allow_down`` leaves it down."""
        try:
            await self._check()
        except EngineUnavailableError as exc:
            if not allow_down:
                await self._client.aclose()
                raise
            logger.warning("%s; alignd starts without it and tries again on each request", exc)
        except BaseException:
            await self._client.aclose()
            raise

    async def _verify(self) -> None:
        """Check the remote (raise ConfigurationError or EngineUnavailableError) and take what it tells."""
        raise NotImplementedError

    async def _check(self) -> None:
        """The start-up checks; up after them, down (with the reason) when they fail."""
        try:
            await self._verify()
        except (EngineUnavailableError, ConfigurationError) as exc:
            self._set_down(str(exc))
            raise
        self._set_up()

    async def _served_card(self) -> tuple[str, dict, int]:
        """(model name, its model card, its context length) from ``/v1/models``, checked."""
        name, base_url, model = self.name, self.base_url, self.model
        async with _translated(name, base_url):
            response = await self._client.get("/v1/models")
        if response.status_code == 401:
            raise ConfigurationError(f"engine '{name}' at {base_url} refused alignd's API key (ALIGND_REMOTE_API_KEY)")
        try:
            cards = response.json()["data"]
            served = {card["id"]: card for card in cards}
        except (ValueError, KeyError, TypeError):
            raise ConfigurationError(
                f"engine '{name}': {base_url} is not a vLLM server (GET /v1/models answered "
                f"{response.status_code} without a model list)"
            ) from None
        if model is None:
            if len(served) != 1:
                raise ConfigurationError(f"engine '{name}': {base_url} serves {sorted(served)}; name the one to use")
            model = next(iter(served))
        elif model not in served:
            raise ConfigurationError(
                f"engine '{name}': {base_url} does not serve '{model}' (it serves {sorted(served)})"
            )
        card = served[model]
        # a LoRA module's card (--lora-modules) has no length of its own: its base model's holds it
        length = card.get("max_model_len") or served.get(card.get("parent") or "", {}).get("max_model_len")
        if card.get("owned_by") != "vllm" or not length:
            raise ConfigurationError(
                f"engine '{name}': {base_url} is not a vLLM server (its model card for '{model}' has no max_model_len)"
            )
        return model, card, int(length)

    # ------------------------------------------------------------------ up and down
    def _set_up(self) -> None:
        if not self._up:
            logger.info("engine '%s' at %s is up (model '%s')", self.name, self.base_url, self.model)
            self._since = time.time()
        self._up, self._detail = True, None

    def _set_down(self, detail: str) -> None:
        if self._up:
            logger.warning("engine '%s' is down: %s", self.name, detail)
            self._since = time.time()
        self._up, self._detail = False, detail
        self._next_check = time.monotonic() + RECHECK_INTERVAL_S

    async def _ready(self) -> None:
        """Return when the remote is up (checking it again if it was down), else raise the 503."""
        if self._parent is not None:
            await self._parent._ready()
            if not self._served_by_parent:
                await self._check_served_name()
            return
        if self._up:
            return
        async with self._check_lock:
            if self._up:
                return
            if time.monotonic() < self._next_check:
                raise EngineUnavailableError(self._detail or f"engine '{self.name}' is down", retry_after=RETRY_AFTER_S)
            try:
                await self._check()
            except ConfigurationError as exc:  # it came back as something else: down until it is right
                raise EngineUnavailableError(str(exc), retry_after=RETRY_AFTER_S) from exc

    async def _check_served_name(self) -> None:
        """An adapter view: the remote must serve its LoRA module under the view's model name."""
        async with _translated(self.name, self.base_url):
            response = await self._client.get("/v1/models")
        served = sorted(card["id"] for card in _checked_json(self.name, response)["data"])
        if self.model not in served:
            raise EngineUnavailableError(
                f"engine '{self.name}' at {self.base_url} does not serve the adapter '{self.model}' (it serves "
                f"{served}): start it with --enable-lora --lora-modules {self.model}=<adapter folder>",
                retry_after=RETRY_AFTER_S,
            )
        self._served_by_parent = True

    def _lost(self, exc: EngineUnavailableError) -> None:
        """A call found the remote gone: down until a check passes again."""
        (self._parent or self)._set_down(str(exc))

    def health(self) -> EngineHealth:
        if self._parent is not None:
            return self._parent.health()
        return EngineHealth("up" if self._up else "down", self.kind, self._detail, self.base_url, self._since)

    async def check_health(self) -> EngineHealth:
        if self._parent is not None:
            return await self._parent.check_health()
        if not self._up:
            try:
                await self._ready()
            except EngineUnavailableError:
                pass
        return self.health()

    def observe_calls(self, observer: EngineCallObserver) -> bool:
        self._meter.observers.append(observer)
        return True

    def unfinished_requests(self) -> int:
        return self._meter.running

    async def shutdown(self) -> None:
        if self._owns_client:
            await self._client.aclose()

    @asynccontextmanager
    async def _call(self, call: str):
        """One engine request: metered, only once the remote is up (a down engine's 503 is at once), and
        the engine marked down when the remote goes away during it."""
        async with self._meter.call(call):
            await self._ready()
            try:
                async with _translated(self.name, self.base_url):
                    yield
            except EngineUnavailableError as exc:
                self._lost(exc)
                raise


# ---------------------------------------------------------------------------- transport errors
@asynccontextmanager
async def _translated(name: str, base_url: str):
    """httpx's transport failures as alignd's: the remote is unavailable (down, refused, dropped)."""
    try:
        yield
    except (
        httpx.ConnectError,
        httpx.RemoteProtocolError,
        httpx.ReadError,
        httpx.WriteError,
        httpx.ConnectTimeout,
        httpx.PoolTimeout,
    ) as exc:
        raise EngineUnavailableError(
            f"engine '{name}' at {base_url} is unavailable ({type(exc).__name__}: {exc}); retry later",
            retry_after=RETRY_AFTER_S,
        ) from exc


def _checked_json(name: str, response: httpx.Response) -> dict:
    if response.status_code == 200:
        return response.json()
    try:
        message = response.json()["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = response.text[:500]
    if response.status_code == 400:
        raise InvalidRequestError(f"engine '{name}' refused the request: {message}")
    if response.status_code in (502, 503, 504):
        raise EngineUnavailableError(
            f"engine '{name}' is unavailable ({response.status_code}: {message})", retry_after=RETRY_AFTER_S
        )
    raise ServerError(f"engine '{name}' failed ({response.status_code}): {message}")
