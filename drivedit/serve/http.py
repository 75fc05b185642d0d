"""The FastAPI app of one replica: routes, request limits and error bodies.

Built per replica (`create_http_app(server)`), after the model is loaded, so the request schema holds
the model's scenario vocabulary as an enum and the config's bounds as minimum / maximum.

The body is read and validated here rather than by a FastAPI body parameter for two reasons: the
size limit must hold before a large body is buffered (413), and `curl -d '{...}'` sends
`application/x-www-form-urlencoded`, which FastAPI would refuse although the body is JSON.
Every error is `{"message": "...", "detail": [{"field", "loc", "msg", "type"}]}`.
"""
from __future__ import annotations

import base64
import json

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from drivedit.serve.engine import SampleJob
from drivedit.serve.layout import layout_problems, normalised_boxes, pixel_labels
from drivedit.serve.schemas import (ErrorResponse, HealthResponse, ImageOut, SamplesResponse, ScenariosResponse,
                                    request_model)


class BodyTooLarge(Exception):
    def __init__(self, size: int, limit: int):
        self.size, self.limit = size, limit


def error_response(status: int, items: list[dict]) -> JSONResponse:
    """One item per problem; `field` is the request field at fault, `body` for the body as a whole."""
    detail = []
    for it in items:
        loc = [x for x in it.get("loc", ()) if x != "body"]
        field = str(loc[0]) if loc and isinstance(loc[0], str) else "body"
        msg = it["msg"]
        if it.get("type") == "json_invalid":
            msg = f"malformed JSON: {msg}"
        detail.append({"field": field, "loc": ["body", *loc], "msg": msg, "type": it.get("type", "invalid")})
    message = "; ".join(f"{d['field']}: {d['msg']}" for d in detail)
    return JSONResponse(status_code=status, content={"message": message, "detail": detail})


class DuplicateKey(ValueError):
    def __init__(self, key: str):
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    seen: dict = {}
    for key, value in pairs:
        if key in seen:
            raise DuplicateKey(key)
        seen[key] = value
    return seen


def duplicate_key(raw: bytes) -> str | None:
    """The first key given twice in one JSON object of `raw`, or None. Malformed JSON is left to the model's
    own parse (which reports it as json_invalid)."""
    try:
        json.loads(raw, object_pairs_hook=_refuse_duplicate_keys)
    except DuplicateKey as e:
        return e.key
    except ValueError:
        return None
    return None


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing (BodyTooLarge) as soon as it is known to exceed `limit` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLarge(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():  # chunked bodies carry no length: count as they arrive
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def create_http_app(server) -> FastAPI:
    """Routes of `server` (a DiTSamplerDeployment replica: `cfg`, `served`, `sample`, `new_seed`)."""
    cfg, served = server.cfg, server.served
    Request_ = request_model(cfg, served.scenarios)
    budget = cfg.sampler.max_image_steps
    limit = cfg.http.max_body_bytes

    app = FastAPI(
        title="drivedit sampling endpoint",
        version=served.version,
        description=f"Driving scenes from {served.version} ({served.image_size} px, {len(served.scenarios)} "
                    f"scenarios). Bodies above {limit} bytes get 413; num_images x steps above {budget} gets 422; "
                    f"an overloaded deployment answers 503.",
    )

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError):
        return error_response(422, list(exc.errors()))

    errors = {
        413: {"model": ErrorResponse, "description": f"body larger than {limit} bytes"},
        422: {"model": ErrorResponse, "description": "a field is invalid, or num_images x steps exceeds the budget"},
        503: {"description": "the deployment is overloaded (queue full); retry later"},
    }

    @app.post(
        "/v1/samples",
        summary="Draw images of one scenario",
        response_class=Response,
        responses={
            200: {"description": "one image: image/png (headers X-Seed, X-Model-Version, X-Batch-Size); "
                                 "several: JSON",
                  "content": {"image/png": {"schema": {"type": "string", "format": "binary"}},
                              "application/json": {"schema": {"$ref": "#/components/schemas/SamplesResponse"}}}},
            **errors,
        },
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": Request_.model_json_schema(ref_template="#/components/schemas/{model}")}}}},
    )
    async def samples(request: Request):
        try:
            raw = await read_body(request, limit)
        except BodyTooLarge as e:
            return error_response(413, [{"msg": f"request body of {e.size} bytes exceeds the limit of {e.limit} "
                                                f"bytes (http.max_body_bytes)", "type": "body_too_large"}])
        if (dup := duplicate_key(raw)) is not None:
            # JSON leaves duplicates undefined and parsers disagree on which wins: refuse rather than guess
            return error_response(422, [{"loc": [dup], "type": "duplicate_key",
                                         "msg": f"the key {dup!r} is given more than once; give each field once"}])
        try:
            req = Request_.model_validate_json(raw or b"null")
        except ValidationError as e:
            return error_response(422, list(e.errors()))
        if req.num_images * req.steps > budget:
            return error_response(422, [{
                "loc": ["num_images"], "type": "compute_budget",
                "msg": f"num_images x steps = {req.num_images} x {req.steps} = {req.num_images * req.steps} exceeds "
                       f"the per-request compute budget of {budget} image-steps; ask for fewer images or steps"}])
        layout, labels = None, None
        if req.layout is not None:
            categories = list(served.box_categories)
            problems = layout_problems(req.layout, categories)
            if problems:
                return error_response(422, problems)
            layout, labels = normalised_boxes(req.layout, categories), pixel_labels(req.layout, served.image_size, served.token_side)
        seed = req.seed if req.seed is not None else server.new_seed()
        job = SampleJob(label=served.label_of[req.scenario], seeds=tuple(seed + i for i in range(req.num_images)),
                        sampler=req.sampler, steps=req.steps, guidance=float(req.guidance), layout=layout,
                        layout_guidance=float(req.layout.guidance) if layout is not None else 1.0)
        result = await server.sample(job)
        headers = {"X-Model-Version": served.version, "X-Seed": str(seed),
                   "X-Batch-Size": str(result.batch_images), "X-Batch-Requests": str(result.batch_requests)}
        if req.num_images == 1 and layout is None:
            return Response(content=result.pngs[0], media_type="image/png", headers=headers)
        body = SamplesResponse(
            model_version=served.version, scenario=req.scenario, sampler=req.sampler, steps=req.steps,
            guidance=req.guidance, width=served.image_size, height=served.image_size,
            batch_size=result.batch_images,
            images=[ImageOut(seed=s, png_base64=base64.b64encode(p).decode("ascii"))
                    for s, p in zip(result.seeds, result.pngs)], labels=labels)
        return JSONResponse(content=body.model_dump(mode="json"), headers=headers)

    @app.get("/v1/scenarios", response_model=ScenariosResponse, summary="The model's scenario vocabulary")
    async def scenarios() -> ScenariosResponse:
        return ScenariosResponse(scenarios=list(served.scenarios), model_version=served.version)

    @app.get("/healthz", response_model=HealthResponse, summary="Liveness, model version and device")
    async def healthz() -> HealthResponse:
        return HealthResponse(model_version=served.version, device=str(served.device),
                              image_size=served.image_size, num_scenarios=len(served.scenarios),
                              box_categories=list(served.box_categories))

    # SamplesResponse is referenced by the 200 response above; make sure the schema carries it.
    base_openapi = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = base_openapi()
            comps = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (SamplesResponse, ImageOut):
                comps.setdefault(model.__name__, model.model_json_schema(
                    ref_template="#/components/schemas/{model}"))
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    return app
