"""The HTTP API of `dgrun serve`: OpenAI-compatible image generation, a native PNG endpoint, and the
recipe, health and metrics. One app for the local worker pool and for Ray Serve replicas.

Bad requests never reach a worker: the body is bounded and validated here, and every error has OpenAI's
shape `{"error": {"message", "type", "param", "code"}}` so existing clients report it as they would
OpenAI's.
"""

from __future__ import annotations

import base64
import hmac
import json
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from dgrun.serve.engine import MAX_IMAGES_PER_REQUEST, GeneratedImage, ImageRequest
from dgrun.serve.metrics import Metrics
from dgrun.serve.pool import Draining, Pool, QueueFull, WorkerDied

MAX_BODY_BYTES = 64 * 1024
MAX_PROMPT_CHARS = 2000
SIZE = r"^[1-9][0-9]{1,4}x[1-9][0-9]{1,4}$"


class Service(Protocol):
    """What the app serves: the recipe, the pool of warm workers, and their state."""

    name: str
    pool: Pool
    metrics: Metrics
    default_seed: int

    def recipe_record(self) -> dict[str, Any]: ...

    def health(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Settings:
    api_key: str | None = None
    timeout: float | None = 300.0


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    size: Annotated[str, Field(pattern=SIZE)] | None = Field(
        None, description="WxH in pixels, multiples of 8"
    )

    @field_validator("size")
    @classmethod
    def _multiple_of_8(cls, value: str | None) -> str | None:
        if value is not None:
            width, height = (int(part) for part in value.split("x"))
            if width % 8 or height % 8 or not (8 <= width <= 4096 and 8 <= height <= 4096):
                raise ValueError("width and height must be multiples of 8 between 8 and 4096")
        return value

    def request(self, default_seed: int, n: int = 1) -> ImageRequest:
        width, height = (int(part) for part in self.size.split("x")) if self.size else (None, None)
        seed = default_seed if self.seed is None else self.seed
        return ImageRequest(self.prompt, seed, n, self.negative_prompt, width, height)


class GenerationBody(_Body):
    """POST /v1/generate: one image as PNG."""


class OpenAIImagesBody(_Body):
    """POST /v1/images/generations, as the OpenAI Images API takes it (plus `seed`, `negative_prompt`)."""

    n: int = Field(1, ge=1, le=MAX_IMAGES_PER_REQUEST)
    response_format: Literal["b64_json", "url"] = "b64_json"
    model: str | None = None
    user: str | None = Field(None, max_length=256)


class ApiError(Exception):
    """An error answered in OpenAI's shape."""

    def __init__(
        self, status: int, message: str, kind: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def create_app(service: Service, settings: Settings) -> Any:
    """The FastAPI app (routes only: workers and the event loop belong to whoever runs it).

    `service` is read at each request, never here: on Ray Serve the app is built before the replica whose
    service it answers for.
    """
    app = FastAPI(title="dgrun serve", docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, error: ApiError) -> JSONResponse:
        headers = {"Retry-After": "1"} if error.status == 429 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.middleware("http")
    async def _count(request: Request, call_next: Any) -> Any:
        started = time.perf_counter()
        response = await call_next(request)
        endpoint = request.url.path
        if endpoint in ("/v1/images/generations", "/v1/generate"):
            service.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
        if endpoint.startswith("/v1/") or endpoint == "/health":
            service.metrics.requests.labels(endpoint, str(response.status_code)).inc()
        return response

    def authorize(request: Request) -> None:
        if settings.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), settings.api_key.encode()
        ):
            raise ApiError(
                401,
                "missing or wrong API key: send `Authorization: Bearer KEY`",
                "invalid_request_error",
                None,
                "invalid_api_key",
            )

    async def parse(request: Request, model: type[_Body]) -> Any:
        size = int(request.headers.get("content-length") or 0)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes", "invalid_request_error")
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, f"request body larger than {MAX_BODY_BYTES} bytes", "invalid_request_error")
        try:
            data = json.loads(raw or b"null")
        except ValueError:
            raise ApiError(400, "the body is not JSON", "invalid_request_error") from None
        if not isinstance(data, dict):
            raise ApiError(400, "the body must be a JSON object", "invalid_request_error")
        try:
            return model.model_validate(data)
        except ValidationError as error:
            first = error.errors(include_url=False)[0]
            param = ".".join(str(p) for p in first["loc"]) or None
            message = str(first["msg"]).removeprefix("Value error, ")
            raise ApiError(
                400, f"{param}: {message}" if param else message, "invalid_request_error", param
            ) from None

    async def make(
        request: Request, image_request: ImageRequest
    ) -> tuple[list[GeneratedImage], dict[str, Any]]:
        try:
            return await service.pool.submit(image_request, settings.timeout, request.is_disconnected)
        except QueueFull:
            raise ApiError(
                429, "the queue is full; retry shortly", "rate_limit_error", None, "queue_full"
            ) from None
        except TimeoutError:
            raise ApiError(504, "the request timed out waiting for an image", "timeout_error") from None
        except Draining:
            raise ApiError(503, "the server is shutting down", "server_error", None, "draining") from None
        except WorkerDied as exc:
            raise ApiError(
                503, f"{exc}; it is being restarted, retry", "server_error", None, "worker_died"
            ) from None
        except ConnectionAbortedError:
            raise ApiError(499, "the client went away", "invalid_request_error") from None
        except Exception as exc:
            raise ApiError(500, f"the pipeline failed: {exc}", "server_error") from None

    def ensure_serving() -> None:
        if service.pool.draining:
            raise ApiError(503, "the server is shutting down", "server_error", None, "draining")
        if not service.pool.serving:
            raise ApiError(
                503, "the workers are still warming up; see /health", "server_error", None, "warming"
            )

    @app.post("/v1/images/generations")
    async def images(request: Request) -> JSONResponse:
        authorize(request)
        body: OpenAIImagesBody = await parse(request, OpenAIImagesBody)
        if body.response_format == "url":
            raise ApiError(
                400,
                "response_format 'url' is not supported: dgrun returns b64_json (the image "
                "itself), so nothing is stored on the server",
                "invalid_request_error",
                "response_format",
            )
        if body.model is not None and body.model != service.name:
            raise ApiError(
                404,
                f"model {body.model!r} is not served here; this server serves {service.name!r}",
                "invalid_request_error",
                "model",
                "model_not_found",
            )
        ensure_serving()
        made, meta = await make(request, body.request(service.default_seed, body.n))
        data = [
            {"b64_json": base64.b64encode(image.png).decode("ascii"), "dgrun": {**meta, "seed": image.seed}}
            for image in made
        ]
        service.metrics.pipeline.observe(meta["seconds"])
        return JSONResponse({"created": int(time.time()), "data": data})

    @app.post("/v1/generate")
    async def generate(request: Request) -> Response:
        authorize(request)
        body: GenerationBody = await parse(request, GenerationBody)
        ensure_serving()
        made, meta = await make(request, body.request(service.default_seed))
        service.metrics.pipeline.observe(meta["seconds"])
        headers = {
            "X-Dgrun-Seed": str(made[0].seed),
            "X-Dgrun-Worker": str(meta["worker"]),
            "X-Dgrun-Batch": str(meta["batch"]),
            "X-Dgrun-Batch-Size": str(meta["batch_size"]),
            "X-Dgrun-Seconds": f"{meta['seconds']:.4f}",
        }
        return Response(made[0].png, media_type="image/png", headers=headers)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        entry = {"id": service.name, "object": "model", "created": 0, "owned_by": "dgrun"}
        return JSONResponse({"object": "list", "data": [entry]})

    @app.get("/v1/recipe")
    async def recipe(request: Request) -> JSONResponse:
        authorize(request)
        return JSONResponse(service.recipe_record())

    @app.get("/health")
    async def health() -> JSONResponse:
        state = service.health()
        code = 200 if state["status"] == "ready" else 503
        return JSONResponse(state, status_code=code)

    @app.get("/metrics")
    async def prometheus() -> Response:
        payload, content_type = service.metrics.render()
        return Response(payload, media_type=content_type)

    return app
