"""metav1.Status bodies exactly as kube-apiserver writes them, and the error that carries one."""

from __future__ import annotations

from typing import Any

__all__ = ["REASONS", "ApiError", "status_body"]

# HTTP code -> metav1.StatusReason, as k8s.io/apimachinery/pkg/api/errors picks them.
REASONS: dict[int, str] = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    406: "NotAcceptable",
    409: "Conflict",
    410: "Expired",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}

# The messages the real server uses when a fault of that code is injected without its own message.
DEFAULT_MESSAGES: dict[int, str] = {
    429: "Too many requests, please try again later.",
    500: "Internal error occurred: injected fault",
    503: "The server is currently unable to handle the request",
    504: "The server was unable to return a response in the time allotted, "
    "but may still be processing the request",
}


def status_body(
    code: int,
    message: str,
    *,
    reason: str | None = None,
    details: dict[str, Any] | None = None,
    continue_token: str | None = None,
) -> dict[str, Any]:
    """A failure ``Status`` in the field order the Go JSON encoder writes it."""
    meta: dict[str, Any] = {}
    if continue_token:
        meta["continue"] = continue_token
    body: dict[str, Any] = {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": meta,
        "status": "Failure",
        "message": message,
    }
    real_reason = reason if reason is not None else REASONS.get(code, "")
    if real_reason:
        body["reason"] = real_reason
    if details:
        body["details"] = details
    body["code"] = code
    return body


class ApiError(Exception):
    """An API failure: ``status`` is the Status body the server answers with (HTTP ``code``)."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        reason: str | None = None,
        details: dict[str, Any] | None = None,
        continue_token: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.status = status_body(
            code, message, reason=reason, details=details, continue_token=continue_token
        )
        self.headers = headers or {}

    @property
    def reason(self) -> str:
        return str(self.status.get("reason", ""))


def qualified(resource: str, group: str) -> str:
    return f"{resource}.{group}" if group else resource


def not_found(resource: str, name: str, group: str = "") -> ApiError:
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = resource
    return ApiError(404, f'{qualified(resource, group)} "{name}" not found', details=details)


def already_exists(resource: str, name: str, group: str = "") -> ApiError:
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = resource
    return ApiError(
        409, f'{qualified(resource, group)} "{name}" already exists', reason="AlreadyExists", details=details
    )


def conflict(resource: str, name: str, group: str = "") -> ApiError:
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = resource
    return ApiError(
        409,
        f'Operation cannot be fulfilled on {qualified(resource, group)} "{name}": the object has been '
        "modified; please apply your changes to the latest version and try again",
        details=details,
    )


def invalid(kind: str, name: str, group: str, field: str, cause_reason: str, cause: str) -> ApiError:
    """422 as field validation reports it: ``Kind "name" is invalid: field: message``."""
    return invalid_fields(kind, name, group, [(field, cause_reason, cause)])


def invalid_fields(kind: str, name: str, group: str, causes: list[tuple[str, str, str]]) -> ApiError:
    """422 for every (field, reason, message) refused, as ``apierrors.NewInvalid`` writes it: several
    are joined as an aggregate error is, ``[field: message, field: message]``."""
    qkind = f"{kind}.{group}" if group else kind
    details: dict[str, Any] = {"name": name}
    if group:
        details["group"] = group
    details["kind"] = kind
    details["causes"] = [
        {"reason": reason, "message": message, "field": field} for field, reason, message in causes
    ]
    errors = [f"{field}: {message}" for field, _, message in causes]
    joined = errors[0] if len(errors) == 1 else "[" + ", ".join(errors) + "]"
    return ApiError(422, f'{qkind} "{name}" is invalid: {joined}', details=details)


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)
