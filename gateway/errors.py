"""One error hierarchy: each class fixes its HTTP status, its error code and any Retry-After.

Domain code raises these; one handler in `gateway.api.envelope` renders the envelope
`{"success": false, "error": {"code", "message", "details"}, "data"?}`.
"""

from __future__ import annotations

from typing import Any, ClassVar


class GatewayError(Exception):
    status: ClassVar[int] = 500
    code: ClassVar[str] = "INTERNAL_ERROR"
    default_message: ClassVar[str] = "Internal error"
    default_retry_after: ClassVar[int | None] = None

    def __init__(
        self,
        message: str | None = None,
        details: str = "",
        *,
        data: dict[str, Any] | None = None,
        retry_after: int | None = None,
    ) -> None:
        self.message = message or self.default_message
        self.details = details
        self.data = data
        self.retry_after = retry_after if retry_after is not None else self.default_retry_after
        super().__init__(f"{self.code}: {self.message}" + (f" ({details})" if details else ""))

    close_connection: bool = False  # answer with `Connection: close` (the body was not read to its end)

    def headers(self) -> dict[str, str]:
        out = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if self.close_connection:
            out["Connection"] = "close"
        return out


class Unauthorized(GatewayError):
    status = 401
    code = "UNAUTHORIZED"
    default_message = "Missing credentials"


class InvalidDeviceKey(GatewayError):
    status = 401
    code = "INVALID_DEVICE_KEY"
    default_message = "Unknown or revoked device key"


class DeviceNotApproved(GatewayError):
    status = 403
    code = "DEVICE_NOT_APPROVED"
    default_message = "Device is not approved"


class Forbidden(GatewayError):
    status = 403
    code = "FORBIDDEN"
    default_message = "Forbidden"


class ValidationFailed(GatewayError):
    status = 400
    code = "VALIDATION_ERROR"
    default_message = "Invalid request"


class NotFound(GatewayError):
    status = 404
    code = "NOT_FOUND"
    default_message = "Not found"


class MethodNotAllowed(GatewayError):
    status = 405
    code = "METHOD_NOT_ALLOWED"
    default_message = "Method not allowed"


class Conflict(GatewayError):
    status = 409
    code = "CONFLICT"
    default_message = "Conflict"


class InvalidToken(GatewayError):
    status = 401
    code = "INVALID_TOKEN"
    default_message = "Unknown, used or revoked provisioning token"


class TokenExpired(GatewayError):
    status = 401
    code = "TOKEN_EXPIRED"
    default_message = "Provisioning token has expired"


class DeviceExists(GatewayError):
    status = 409
    code = "DEVICE_EXISTS"
    default_message = "A device with this id is already registered"


class DuplicateImage(GatewayError):
    status = 409
    code = "DUPLICATE_IMAGE"
    default_message = "An identical image is already stored"


class NearDuplicateImage(GatewayError):
    status = 409
    code = "NEAR_DUPLICATE_IMAGE"
    default_message = "A nearly identical frame of this device was stored moments ago"


class RequestTimeout(GatewayError):
    status = 408
    code = "REQUEST_TIMEOUT"
    default_message = "The request body stalled"


class PayloadTooLarge(GatewayError):
    status = 413
    code = "PAYLOAD_TOO_LARGE"
    default_message = "Payload too large"


class UnsupportedMediaType(GatewayError):
    status = 415
    code = "UNSUPPORTED_MEDIA_TYPE"
    default_message = "Image bytes are neither JPEG nor PNG"


class RateLimited(GatewayError):
    status = 429
    code = "RATE_LIMITED"
    default_message = "Too many uploads from this device"
    default_retry_after = 1


class InternalError(GatewayError):
    pass


class BadGateway(GatewayError):
    status = 502
    code = "BAD_GATEWAY"
    default_message = "The cloud's answer could not be used"


class ServiceUnavailable(GatewayError):
    status = 503
    code = "SERVICE_UNAVAILABLE"
    default_message = "Service temporarily unavailable"
    default_retry_after = 5


class InsufficientStorage(GatewayError):
    status = 507
    code = "INSUFFICIENT_STORAGE"
    default_message = "Storage is full"
    default_retry_after = 60


class StartRefused(Exception):
    """Starting would lose or misread acknowledged data; the message names the file and what to do.
    `gateway serve` prints it and exits with status 2 (not an HTTP error: nothing is served)."""


ALL_ERRORS: tuple[type[GatewayError], ...] = (
    Unauthorized,
    InvalidDeviceKey,
    DeviceNotApproved,
    Forbidden,
    ValidationFailed,
    NotFound,
    MethodNotAllowed,
    Conflict,
    InvalidToken,
    TokenExpired,
    DeviceExists,
    DuplicateImage,
    NearDuplicateImage,
    RequestTimeout,
    PayloadTooLarge,
    UnsupportedMediaType,
    RateLimited,
    InternalError,
    BadGateway,
    ServiceUnavailable,
    InsufficientStorage,
)
