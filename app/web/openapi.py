"""The OpenAPI 3.1 document of the JSON API (served at /api/openapi.json), generated
from what the server runs: the routes Flask serves, the operations the views
declare (app/web/api.py) and the JSON Schema of the pydantic models those views
validate with (app/web/schemas.py)."""

from __future__ import annotations

import re
from typing import Any

from flask import Flask
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from app.web import schemas
from app.web.api import OPERATIONS, Operation

REF = "#/components/schemas/{model}"
RESPONSES = {
    400: "The request breaks this document (the message names the field)",
    401: "No or unknown bearer token",
    429: "Too many requests: wait Retry-After seconds",
}
_PATH_PARAM = re.compile(r"<(?:[a-z]+:)?([a-z_]+)>")


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A query parameter's schema without `null`: a query string cannot say null."""
    branches = schema.get("anyOf")
    if branches is None:
        return schema
    kept = [b for b in branches if b.get("type") != "null"]
    rest = {k: v for k, v in schema.items() if k not in {"anyOf", "default"}}
    return {**rest, **kept[0]} if len(kept) == 1 else {**rest, "anyOf": kept}


def _query_parameters(model: type[BaseModel], refs: dict[str, Any]) -> list[dict[str, Any]]:
    properties = refs["properties"]
    return [
        {
            "name": name,
            "in": "query",
            "required": info.is_required(),
            "description": info.description or "",
            "schema": _without_null(properties[name]),
        }
        for name, info in model.model_fields.items()
    ]


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error(description: str) -> dict[str, Any]:
    return _json({"$ref": REF.format(model="Error")}, description)


def _operation(
    op: Operation,
    path_params: list[str],
    refs: dict[Any, dict[str, Any]],
    query_schemas: dict[type[BaseModel], dict[str, Any]],
    rate_limited: bool,
) -> dict[str, Any]:
    status, model, description = op.ok
    ok = _json(refs[(model, "serialization")], description)
    if status == 201:
        ok["headers"] = {
            "Location": {
                "description": "The run's URL in this API",
                "required": True,
                "schema": {"type": "string"},
            }
        }
    if op.links:
        ok["links"] = op.links
    errors = {400: RESPONSES[400], 401: RESPONSES[401], **op.errors}
    if rate_limited:
        errors[429] = RESPONSES[429]
    responses: dict[str, Any] = {str(status): ok}
    for code in sorted(errors):
        responses[str(code)] = _error(errors[code])
    responses["401"]["headers"] = {
        "WWW-Authenticate": {"required": True, "schema": {"type": "string"}}
    }
    parameters: list[dict[str, Any]] = [
        {
            "name": name,
            "in": "path",
            "required": True,
            "schema": {"type": "string", "minLength": 1},
            "description": "A run's id (404 for any string that is not one)",
        }
        for name in path_params
    ]
    parameters += _query_parameters(op.query, query_schemas[op.query])
    parameters += list(op.headers)
    document: dict[str, Any] = {
        "operationId": op.operation_id,
        "summary": op.summary,
        "parameters": parameters,
        "responses": responses,
    }
    if op.body is not None:
        document["requestBody"] = {
            "required": op.body_required,
            "content": {"application/json": {"schema": refs[(op.body, "validation")]}},
        }
    return document


def openapi_document(app: Flask, server: str) -> dict[str, Any]:
    bodies = [(op.body, "validation") for op in OPERATIONS.values() if op.body is not None]
    answers = [(op.ok[1], "serialization") for op in OPERATIONS.values()]
    models: list[Any] = [*dict.fromkeys([*bodies, *answers, (schemas.Error, "serialization")])]
    refs, defs = models_json_schema(models, ref_template=REF)
    components = defs.get("$defs", {})
    query_schemas = {
        op.query: op.query.model_json_schema(ref_template=REF) for op in OPERATIONS.values()
    }
    for schema in query_schemas.values():
        components.update(schema.pop("$defs", {}))
    rate_limited = bool(
        "agentloop_limiter" in app.extensions and app.config.get("RATELIMIT_ENABLED", True)
    )
    paths: dict[str, dict[str, Any]] = {}
    for rule in app.url_map.iter_rules():
        op = OPERATIONS.get(rule.endpoint)
        if op is None:
            continue
        path = _PATH_PARAM.sub(r"{\1}", rule.rule)
        for method in sorted((rule.methods or set()) - {"HEAD", "OPTIONS"}):
            paths.setdefault(path, {})[method.lower()] = _operation(
                op, sorted(rule.arguments), refs, query_schemas, rate_limited
            )
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "agentloop API",
            "version": "1",
            "description": "Create and follow agent runs; approve, reject or cancel them. "
            'Errors are {"error": message}: 400 when a request breaks this document, '
            "422 when it fits but the service refuses what it says.",
        },
        "servers": [{"url": server}],
        "security": [{"bearer": []}],
        "paths": dict(sorted(paths.items())),
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `agentloop user add NAME --token`",
                }
            },
            "schemas": dict(sorted(components.items())),
        },
    }
