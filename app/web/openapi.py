"""The OpenAPI 3 document of the JSON API (served at /api/openapi.json)."""

from __future__ import annotations

from typing import Any

from app.engine.models import RunStatus


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": {"$ref": "#/components/responses/Invalid"},
    "401": {"$ref": "#/components/responses/Unauthorized"},
    "404": {"$ref": "#/components/responses/NotFound"},
}
RUN_ID = {"name": "run_id", "in": "path", "required": True, "schema": {"type": "string"}}


def _decision(summary: str, body: str, required: list[str]) -> dict[str, Any]:
    return {
        "post": {
            "summary": summary,
            "parameters": [RUN_ID],
            "requestBody": {
                "required": bool(required),
                "content": {"application/json": {"schema": {**_ref(body)}}},
            },
            "responses": {
                "200": _json(_ref("Run"), "The run, resumed"),
                "403": {"$ref": "#/components/responses/Forbidden"},
                "409": {"$ref": "#/components/responses/Conflict"},
                **ERRORS,
            },
        }
    }


SCHEMAS: dict[str, Any] = {
    "Error": {
        "type": "object",
        "required": ["error"],
        "properties": {"error": {"type": "string", "description": "What went wrong"}},
    },
    "NewRun": {
        "type": "object",
        "required": ["task"],
        "properties": {
            "task": {"type": "string", "maxLength": 10000},
            "config": {
                "type": "object",
                "description": "RunConfig: planner, runbook, max_iterations, timeout, "
                "approval_required, approvers, retry_policy {max_retries, base, factor, "
                "max_backoff, jitter}, max_replans, budget_tokens, budget_usd, …",
                "additionalProperties": True,
            },
        },
    },
    "Run": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "task": {"type": "string"},
            "status": {"type": "string", "enum": [s.value for s in RunStatus]},
            "planner": {"type": "string"},
            "config": {"type": "object"},
            "iteration": {"type": "integer"},
            "plan_version": {"type": "integer"},
            "tokens_total": {"type": "integer"},
            "cost_usd": {"type": "number"},
            "created_by": {"type": "string", "nullable": True},
            "created_at": {"type": "string", "format": "date-time"},
            "started_at": {"type": "string", "format": "date-time", "nullable": True},
            "finished_at": {"type": "string", "format": "date-time", "nullable": True},
            "report": {"type": "string", "nullable": True},
            "error": {"type": "string", "nullable": True},
            "url": {"type": "string", "format": "uri"},
        },
    },
    "RunDetail": {
        "allOf": [
            _ref("Run"),
            {
                "type": "object",
                "properties": {
                    "steps": {"type": "array", "items": {"type": "object"}},
                    "pending_approval": {"type": "object", "nullable": True},
                    "last_event": {"type": "integer"},
                },
            },
        ]
    },
    "Event": {
        "type": "object",
        "properties": {
            "id": {"type": "integer"},
            "iteration": {"type": "integer"},
            "step_id": {"type": "integer", "nullable": True},
            "kind": {
                "type": "string",
                "enum": [
                    "observation",
                    "decision",
                    "error",
                    "plan",
                    "approval",
                    "retry",
                    "tool_call",
                    "llm_call",
                    "status",
                ],
            },
            "message": {"type": "string"},
            "data": {"type": "object"},
            "created_at": {"type": "string", "format": "date-time"},
        },
    },
    "Approve": {
        "type": "object",
        "properties": {
            "args": {"type": "object", "description": "Edited args, checked by the tool"},
            "comment": {"type": "string"},
            "approval_id": {"type": "string", "description": "Decide only this approval"},
        },
    },
    "Reject": {
        "type": "object",
        "required": ["reason"],
        "properties": {
            "reason": {"type": "string", "description": "The agent re-plans around it"},
            "approval_id": {"type": "string"},
        },
    },
}


def _response(description: str) -> dict[str, Any]:
    return _json(_ref("Error"), description)


def openapi_document(server: str) -> dict[str, Any]:
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "agentloop API",
            "version": "1",
            "description": "Create and follow agent runs; approve, reject or cancel them.",
        },
        "servers": [{"url": server}],
        "security": [{"bearer": []}],
        "paths": {
            "/api/runs": {
                "get": {
                    "summary": "List runs, newest first",
                    "parameters": [
                        {
                            "name": "status",
                            "in": "query",
                            "schema": {"type": "string", "enum": [s.value for s in RunStatus]},
                        },
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 200},
                        },
                        {
                            "name": "offset",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 0},
                        },
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "runs": {"type": "array", "items": _ref("Run")},
                                    "total": {"type": "integer"},
                                },
                            },
                            "A page of runs",
                        ),
                        **ERRORS,
                    },
                },
                "post": {
                    "summary": "Create a run",
                    "parameters": [
                        {
                            "name": "Idempotency-Key",
                            "in": "header",
                            "required": False,
                            "description": "Retrying with the same key returns the run the "
                            "first request created (409 if the request differs).",
                            "schema": {"type": "string", "minLength": 1, "maxLength": 200},
                        }
                    ],
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _ref("NewRun")}},
                    },
                    "responses": {"201": _json(_ref("Run"), "The new run"), **ERRORS},
                },
            },
            "/api/runs/{run_id}": {
                "get": {
                    "summary": "A run with its steps and pending approval",
                    "parameters": [RUN_ID],
                    "responses": {"200": _json(_ref("RunDetail"), "The run"), **ERRORS},
                }
            },
            "/api/runs/{run_id}/events": {
                "get": {
                    "summary": "The run's timeline after an event id",
                    "parameters": [
                        RUN_ID,
                        {"name": "after", "in": "query", "schema": {"type": "integer"}},
                    ],
                    "responses": {
                        "200": _json(
                            {
                                "type": "object",
                                "properties": {
                                    "events": {"type": "array", "items": _ref("Event")},
                                    "last_event": {"type": "integer"},
                                    "status": {"type": "string"},
                                },
                            },
                            "Events, oldest first",
                        ),
                        **ERRORS,
                    },
                }
            },
            "/api/runs/{run_id}/approve": _decision("Approve the waiting step", "Approve", []),
            "/api/runs/{run_id}/reject": _decision("Reject the waiting step", "Reject", ["reason"]),
            "/api/runs/{run_id}/cancel": {
                "post": {
                    "summary": "Cancel an active run",
                    "parameters": [RUN_ID],
                    "responses": {
                        "200": _json(_ref("Run"), "The cancelled run"),
                        "409": {"$ref": "#/components/responses/Conflict"},
                        **ERRORS,
                    },
                }
            },
        },
        "components": {
            "securitySchemes": {
                "bearer": {
                    "type": "http",
                    "scheme": "bearer",
                    "description": "A token from `agentloop user add NAME --token`",
                }
            },
            "schemas": SCHEMAS,
            "responses": {
                "Invalid": _response("Invalid input"),
                "Unauthorized": _response("No or unknown bearer token"),
                "Forbidden": _response("Not an approver of this run"),
                "NotFound": _response("No such run"),
                "Conflict": _response("The run's state does not allow this"),
            },
        },
    }
