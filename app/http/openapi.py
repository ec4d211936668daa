"""The OpenAPI document at /openapi.json: Litestar's paths with msgspec's exact component schemas.

Litestar's translation of msgspec constraints drops some bounds (exclusive minimums, zero
minimums, nested item bounds); msgspec's own JSON Schema keeps them all, and a client or a
fuzzer reading the schema should see the bounds the server enforces.
"""

from __future__ import annotations

import inspect
from typing import Any

import msgspec

from app.http import schemas


def _structs() -> list[type[msgspec.Struct]]:
    return [
        obj
        for name, obj in vars(schemas).items()
        if inspect.isclass(obj) and issubclass(obj, msgspec.Struct) and obj.__module__ == schemas.__name__
    ]


def _close_objects(structs: list[type[msgspec.Struct]], components: dict[str, Any]) -> None:
    """`additionalProperties: false` where the server rejects unknown fields."""
    for struct in structs:
        if struct.__struct_config__.forbid_unknown_fields and struct.__name__ in components:
            components[struct.__name__]["additionalProperties"] = False


def openapi_document(litestar_schema: dict[str, Any]) -> dict[str, Any]:
    structs = _structs()
    _, components = msgspec.json.schema_components(structs, ref_template="#/components/schemas/{name}")
    _close_objects(structs, components)
    document = dict(litestar_schema)
    document["components"] = dict(document.get("components") or {})
    merged = dict(document["components"].get("schemas") or {})
    merged.update(components)
    document["components"]["schemas"] = merged
    return document
