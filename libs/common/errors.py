"""RFC 9457 problem details: one error base class, rendered the same way by every service."""

from __future__ import annotations

import logging
from typing import Any, ClassVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("steward.errors")


class Problem(Exception):
    """An error the client can act on. Subclasses fix the status and type."""

    status: ClassVar[int] = 400
    type_: ClassVar[str] = "bad-request"
    title: ClassVar[str] = "Bad request"

    def __init__(
        self, detail: str, *, status: int | None = None, title: str | None = None, **extra: Any
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status_code = status or self.status
        self.title_text = title or self.title
        self.extra = extra

    def headers(self) -> dict[str, str] | None:
        return None

    def body(self, instance: str | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "type": f"urn:steward:problem:{self.type_}",
            "title": self.title_text,
            "status": self.status_code,
            "detail": self.detail,
        }
        if instance:
            body["instance"] = instance
        body.update(self.extra)
        return body


class BadRequest(Problem):
    pass


class Unauthorized(Problem):
    status = 401
    type_ = "unauthorized"
    title = "Unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="steward"'}


class Forbidden(Problem):
    status = 403
    type_ = "forbidden"
    title = "Forbidden"


class NotFound(Problem):
    status = 404
    type_ = "not-found"
    title = "Not found"


class Conflict(Problem):
    status = 409
    type_ = "conflict"
    title = "Conflict"


class Unprocessable(Problem):
    status = 422
    type_ = "validation-error"
    title = "Validation error"


class ServiceUnavailable(Problem):
    status = 503
    type_ = "unavailable"
    title = "Service unavailable"


def problem_response(problem: Problem, request: Request | None = None) -> JSONResponse:
    return JSONResponse(
        problem.body(request.url.path if request else None),
        status_code=problem.status_code,
        media_type=PROBLEM_JSON,
        headers=problem.headers(),
    )


def problem_responses(*problems: type[Problem]) -> dict[int | str, dict[str, Any]]:
    """The ``responses=`` of a route, so its OpenAPI document lists the errors it may return."""
    kinds: tuple[type[Problem], ...] = (Unprocessable, *problems)
    return {p.status: {"description": p.title, "content": {PROBLEM_JSON: {}}} for p in kinds}


def authenticated_responses() -> dict[int | str, dict[str, Any]]:
    """A router's ``responses=``: every route behind a credential may answer 401 (none or a bad
    one) and 403 (one without the role or scope), besides 400 (a body that is not JSON) and 422."""
    return problem_responses(BadRequest, Unauthorized, Forbidden)


def install_error_handlers(app: FastAPI) -> None:
    async def on_problem(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, Problem)
        return problem_response(exc, request)

    async def on_validation(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        errors = [
            {
                "field": ".".join(str(p) for p in err.get("loc", ()) if p != "body"),
                "message": err.get("msg", ""),
                "type": err.get("type", ""),
            }
            for err in exc.errors()
        ]
        detail = "; ".join(f"{e['field'] or 'body'}: {e['message']}" for e in errors)
        return problem_response(Unprocessable(detail, errors=errors), request)

    async def on_http(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        problem = Problem(str(exc.detail), status=exc.status_code, title=str(exc.detail))
        return problem_response(problem, request)

    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error", exc_info=exc)
        problem = Problem("internal error; the request changed nothing", status=500, title="Error")
        return problem_response(problem, request)

    app.add_exception_handler(Problem, on_problem)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_unexpected)
