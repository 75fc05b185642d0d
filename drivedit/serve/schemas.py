"""Request and response models of the HTTP API, with their bounds taken from the operator's config.

The request model is built per deployment (`request_model(cfg, scenarios)`): the scenario field is an
enum of the served model's vocabulary and every number carries the configured bounds, so `/openapi.json`
documents exactly what this endpoint accepts and pydantic's errors name the offending field.
Requests are validated strictly: `"3"` is not an integer and unknown fields (a `model`, say) are refused.
An integer written as a float with no fraction (`2.0`) is accepted, as the published JSON Schema's
`integer` (which counts 2.0 as an integer) promises; `2.5` is refused.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from drivedit.config.serve import ServeApp

MAX_SEED = 2**53 - 1  # the largest integer every JSON client represents exactly


def _integral_float_to_int(value: Any) -> Any:
    """2.0 -> 2 (JSON Schema's `integer` includes it); anything else goes to the strict int check unchanged."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# an integer field that accepts what the schema's `integer` accepts, and nothing looser ("3" and true stay refused)
JsonInt = Annotated[int, BeforeValidator(_integral_float_to_int)]


class SampleRequestBase(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class LayoutBox(SampleRequestBase):
    category: str = Field(..., description="box category, one of the served layout branch's (GET /healthz)")
    x1: float = Field(..., allow_inf_nan=False, description="left edge in the layout image's pixels")
    y1: float = Field(..., allow_inf_nan=False, description="top edge")
    x2: float = Field(..., allow_inf_nan=False, description="right edge (> x1, <= width)")
    y2: float = Field(..., allow_inf_nan=False, description="bottom edge (> y1, <= height)")


class LayoutIn(SampleRequestBase):
    """Boxes the images must follow (a model with a layout branch); they come back as the images' labels."""

    width: int = Field(..., ge=1, le=65536, description="width of the image the boxes are drawn on, in pixels")
    height: int = Field(..., ge=1, le=65536, description="height of that image")
    boxes: list[LayoutBox] = Field(..., max_length=512, description="the boxes (may be empty: a scene without objects)")
    guidance: float = Field(4.0, ge=1.0, le=20.0, allow_inf_nan=False,
                            description="guidance on the layout (1 = none), on top of `guidance` on the scenario "
                                        "(the generate job's default, BENCHMARKS.md)")


def request_model(cfg: ServeApp, scenarios: list[str]) -> type[SampleRequestBase]:
    """`POST /v1/samples` body for this deployment's model and bounds."""
    if not scenarios:
        raise ValueError("the served model has an empty scenario vocabulary; nothing could be requested")
    s = cfg.sampler
    fields = {
        "scenario": (Literal[tuple(scenarios)], Field(
            ..., description="scenario to draw, one of the model's vocabulary (GET /v1/scenarios)")),
        "num_images": (JsonInt, Field(
            1, ge=1, le=s.max_images,
            description=f"images to draw; 1 returns image/png, more return JSON with base64 PNGs. "
                        f"num_images x steps may not exceed {s.max_image_steps}")),
        "steps": (JsonInt, Field(
            s.default_steps, ge=s.min_steps, le=s.max_steps, description="denoising steps")),
        "guidance": (float, Field(
            s.default_guidance, ge=s.min_guidance, le=s.max_guidance, allow_inf_nan=False,
            description=f"{'classifier-free' if s.guidance_kind == 'cfg' else 'superclass'} guidance scale "
                        f"(1 = unguided)")),
        "sampler": (Literal[tuple(s.samplers)], Field(s.default_sampler, description="denoising sampler")),
        "seed": (Annotated[int, Field(ge=0, le=MAX_SEED), BeforeValidator(_integral_float_to_int)] | None, Field(
            None,
            description="seed of the first image; image i uses seed + i. Omitted: a random seed, returned in the "
                        "response. The same seed and settings give the same bytes, whatever other requests are "
                        "answered at the same time")),
        "layout": (LayoutIn | None, Field(
            None, description="boxes to draw the scene around (a model with a layout branch); the answer is then "
                              "JSON with the images and their labels, whatever num_images")),
    }
    return create_model("SampleRequest", __base__=SampleRequestBase,
                        __doc__="Draw images of one scenario from the served model.", **fields)


class ImageOut(BaseModel):
    seed: int = Field(..., description="seed this image was drawn with")
    png_base64: str = Field(..., description="the image as a base64-encoded PNG")


class SamplesResponse(BaseModel):
    """JSON answer to a request for more than one image."""

    model_version: str = Field(..., description="version of the model that drew the images")
    scenario: str = Field(..., description="the requested scenario")
    sampler: str = Field(..., description="sampler used")
    steps: int = Field(..., description="denoising steps used")
    guidance: float = Field(..., description="guidance scale used")
    width: int = Field(..., description="image width in pixels")
    height: int = Field(..., description="image height in pixels")
    batch_size: int = Field(..., description="images answered together with this request's (one replica call with "
                                             "the same settings); each image is drawn on its own, so this never "
                                             "changes the bytes")
    images: list[ImageOut] = Field(..., description="the images, image i drawn with seed + i")
    labels: list[dict] | None = Field(
        None, description="with a layout: every image's labels, BDD100K-style {category, box2d} in the image's "
                          "pixels (the layout's boxes scaled to width x height); a box smaller than one of the "
                          "model's tokens is labelled an ignore region (attributes {\"ignore\": true, ...}): "
                          "the model cannot promise to draw it")


class ScenariosResponse(BaseModel):
    scenarios: list[str] = Field(..., description="the model's scenario vocabulary, in class-id order")
    model_version: str = Field(..., description="version of the served model")


class HealthResponse(BaseModel):
    status: Literal["ok"] = Field("ok", description="the replica is loaded and answering")
    model_version: str = Field(..., description="version of the served model")
    device: str = Field(..., description="device the replica samples on, e.g. cpu or cuda:0")
    image_size: int = Field(..., description="side of the generated images in pixels")
    num_scenarios: int = Field(..., description="size of the scenario vocabulary")
    box_categories: list[str] = Field([], description="layout box categories the model follows (empty: no layout)")


class ErrorItem(BaseModel):
    field: str = Field(..., description="the request field at fault (`body` for the body as a whole)")
    loc: list[str | int] = Field(..., description="full location, as FastAPI reports it")
    msg: str = Field(..., description="what is wrong and what is allowed")
    type: str = Field(..., description="machine-readable error kind")


class ErrorResponse(BaseModel):
    message: str = Field(..., description="all problems, one line per field")
    detail: list[ErrorItem] = Field(..., description="one item per problem")
