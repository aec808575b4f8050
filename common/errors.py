"""Errors that may cross the site boundary.

A ClientApp's exception text is sent to the server by Flower, so every error that can
leave a site carries a short *reason code* and, at most, a hashed identifier: never a
path, a patient name or a DICOM tag value.  The full local detail (for hospital IT)
goes in ``local_detail``, which is only ever written to site-local logs.
"""

from __future__ import annotations

import hashlib

__all__ = ["FedradError", "ConfigError", "SiteDataError", "hashed_id"]


def hashed_id(value: str, *, salt: str = "", length: int = 12) -> str:
    """Return a short, stable, non-reversible identifier for ``value``.

    Used to refer to a file or a site in messages that may leave the site.
    """
    digest = hashlib.sha256((salt + "\x00" + str(value)).encode("utf-8")).hexdigest()
    return digest[:length]


class FedradError(Exception):
    """Base class for fedrad errors.

    Parameters
    ----------
    code:
        A short kebab-case reason code, e.g. ``"no-pixel-data"``.
    message:
        Text safe to leave the site: what went wrong and how to fix it, without paths
        or patient data.
    local_detail:
        Optional site-local detail (may contain paths); never part of ``str(err)``.
    """

    def __init__(self, code: str, message: str, *, local_detail: str | None = None) -> None:
        self.code = code
        self.message = message
        self.local_detail = local_detail
        super().__init__(f"[{code}] {message}")


class ConfigError(FedradError, ValueError):
    """A configuration key or value is unknown or invalid."""

    def __init__(self, message: str, *, code: str = "bad-config") -> None:
        super().__init__(code, message)


class SiteDataError(FedradError):
    """A site's data cannot be used (no usable image, bad labels file, ...)."""
