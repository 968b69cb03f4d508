"""The weight-update routes of SGLang's HTTP contract: from disk, from a colocated trainer's shared
tensors, and over a collective group the trainer leads (formats: tpfleet.weight_sync).

Every answer is `{"success": bool, "message": str}`: 200 when the update is in place, 400 naming
the field when the request is refused (the old weights and weight_version still serve), 503 when
the engine is gone. Bodies are checked here, so a refusal always has that shape. Updates run on the
engine thread between two steps, once no request is in flight unless generation is paused or the update
aborts them (tpfleet.server.async_engine): an answer never mixes two weight versions unasked.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from tpfleet.engine.sequence import InvalidRequest
from tpfleet.server.async_engine import AsyncEngine, EngineUnavailable
from tpfleet.server.protocol import ControlBody


class UpdateWeightsFromDiskBody(ControlBody):
    model_path: str
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True  # the prefix cache is always reset: its entries came from the old weights
    abort_all_requests: bool = False
    is_async: bool = False
    torch_empty_cache: bool = False
    keep_pause: bool = False
    recapture_cuda_graph: bool = False
    token_step: int = 0


class UpdateWeightsFromTensorBody(ControlBody):
    serialized_named_tensors: list[str]
    load_format: str | None = None
    weight_version: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class InitWeightsUpdateGroupBody(ControlBody):
    master_address: str
    master_port: int
    rank_offset: int
    world_size: int
    group_name: str = "weight_update_group"
    backend: str = "nccl"


class UpdateWeightsFromDistributedBody(ControlBody):
    names: list[str]
    dtypes: list[str]
    shapes: list[list[int]]
    group_name: str = "weight_update_group"
    weight_version: str | None = None
    load_format: str | None = None
    flush_cache: bool = True
    abort_all_requests: bool = False


class DestroyWeightsUpdateGroupBody(ControlBody):
    group_name: str = "weight_update_group"


DISK_LOAD_FORMATS = (None, "auto", "safetensors")
REACH_TIMEOUT_S = 60.0  # how long the trainer's rendezvous may take to accept connections


async def reach_rendezvous(host: str, port: int) -> None:
    """Wait, here and not on the engine thread (which would stop generating), until the trainer's rendezvous
    accepts connections: a wrong port then costs a minute and a 400 naming it, not the ranks' whole join
    timeout with nothing served."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + REACH_TIMEOUT_S
    while True:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), port), 5)
            writer.close()
            return
        except (OSError, asyncio.TimeoutError) as error:
            if loop.time() > deadline:
                raise InvalidRequest("master_port", f"nothing accepted a connection at {host}:{port} in "
                                                    f"{REACH_TIMEOUT_S:g}s ({error or 'timed out'}): is the "
                                                    f"trainer creating its group there?") from None
            await asyncio.sleep(0.5)


def body_schema(model: type[ControlBody]) -> dict:
    """The body's schema for the OpenAPI document: the route reads its body itself, to answer in its own shape."""
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}


def answer(success: bool, message: str, status: int = 200) -> JSONResponse:
    """A message may quote the request, lone surrogates included: escape what UTF-8 cannot carry."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return JSONResponse({"success": success, "message": message}, status)


async def _parse(request: Request, model: type[ControlBody]) -> ControlBody:
    try:
        body = await request.json()
    except (ValueError, RecursionError):  # RecursionError: nested deeper than the JSON parser goes
        raise InvalidRequest("body", "not a JSON document") from None
    try:
        return model.model_validate({} if body is None else body)
    except ValidationError as error:
        first = error.errors()[0]
        where = "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in first["loc"]).lstrip(".")
        raise InvalidRequest(where or "body", first["msg"]) from None


def weights_router(aengine: AsyncEngine) -> APIRouter:
    router = APIRouter()
    engine = aengine.engine

    async def run(request: Request, model: type[ControlBody], call: Callable[[ControlBody], Callable[[], list[dict]]],
                  describe: Callable[[ControlBody, list[dict]], str],
                  before: Callable[[ControlBody], Awaitable[None]] | None = None, update: bool = False) -> JSONResponse:
        """An `update` runs in turn with the others, once no request is in flight, unless generation is paused
        or it aborts them itself (AsyncEngine.run_on_engine)."""
        try:
            body = await _parse(request, model)
            if before is not None:
                await before(body)
            kind = ("aborting" if body.abort_all_requests else "quiet") if update else None
            reports = await aengine.run_on_engine(call(body), update=kind)
        except InvalidRequest as error:
            return answer(False, str(error), 400)
        except EngineUnavailable as error:
            return answer(False, f"engine unavailable: {error}", 503)
        return answer(True, describe(body, reports))

    def aborts(body) -> Callable[[], None] | None:
        """abort_all_requests: once the update is checked and staged, so that a refused one aborts nothing."""
        return aengine.abort_all_now if body.abort_all_requests else None

    def version(body) -> str:
        return f" (weight_version {body.weight_version})" if body.weight_version is not None else ""

    @router.post("/update_weights_from_disk", openapi_extra=body_schema(UpdateWeightsFromDiskBody))
    async def update_weights_from_disk(request: Request):
        def call(body: UpdateWeightsFromDiskBody):
            if body.load_format not in DISK_LOAD_FORMATS:
                raise InvalidRequest("load_format", "this engine loads safetensors checkpoints (null, 'auto' or "
                                                    "'safetensors')")
            return lambda: engine.update_weights_from_disk(body.model_path, body.weight_version, aborts(body))
        return await run(request, UpdateWeightsFromDiskBody, call,
                         lambda body, _: f"loaded {body.model_path}{version(body)}", update=True)

    @router.post("/update_weights_from_tensor", openapi_extra=body_schema(UpdateWeightsFromTensorBody))
    async def update_weights_from_tensor(request: Request):
        return await run(request, UpdateWeightsFromTensorBody,
                         lambda body: lambda: engine.update_weights_from_tensor(
                             body.serialized_named_tensors, body.load_format, body.weight_version, aborts(body)),
                         lambda body, reports: f"loaded {reports[0]['tensors']} tensors{version(body)}", update=True)

    async def join_checked(body: InitWeightsUpdateGroupBody) -> None:
        await asyncio.to_thread(engine.weights.check_join, body.master_address, body.master_port,  # it resolves
                                body.rank_offset, body.world_size, body.group_name, body.backend)
        await reach_rendezvous(body.master_address, body.master_port)

    @router.post("/init_weights_update_group", openapi_extra=body_schema(InitWeightsUpdateGroupBody))
    async def init_weights_update_group(request: Request):
        return await run(request, InitWeightsUpdateGroupBody,
                         lambda body: lambda: engine.init_weights_update_group(
                             body.master_address, body.master_port, body.rank_offset, body.world_size,
                             body.group_name, body.backend),
                         lambda body, reports: f"joined {body.group_name} as ranks "
                                               f"{[report['group_rank'] for report in reports]}",
                         before=join_checked)

    @router.post("/update_weights_from_distributed", openapi_extra=body_schema(UpdateWeightsFromDistributedBody))
    async def update_weights_from_distributed(request: Request):
        return await run(request, UpdateWeightsFromDistributedBody,
                         lambda body: lambda: engine.update_weights_from_distributed(
                             body.names, body.dtypes, body.shapes, body.group_name, body.weight_version,
                             body.load_format, aborts(body)),
                         lambda body, reports: f"received {reports[0]['tensors']} tensors{version(body)}",
                         update=True)

    @router.post("/destroy_weights_update_group", openapi_extra=body_schema(DestroyWeightsUpdateGroupBody))
    async def destroy_weights_update_group(request: Request):
        return await run(request, DestroyWeightsUpdateGroupBody,
                         lambda body: lambda: engine.destroy_weights_update_group(body.group_name),
                         lambda body, _: f"destroyed {body.group_name}")

    return router
