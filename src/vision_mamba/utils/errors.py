"""UserError: a mistake in the user's input, reported as one short message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Something the user gave us is wrong (a path, a config value, a file).

    The message must say what is wrong and how to fix it; the entry points print it without a traceback.
    Subclasses may exist in any layer (data, models, kernels) -- the entry points catch this base class and,
    duck-typed, any exception with ``user_error = True`` (so ``vim_kernels`` and ``models`` need not import us).
    """

    user_error = True


def find_user_error(exc: BaseException) -> BaseException | None:
    """Walk the cause/context chain (Hydra wraps errors raised during instantiation) for a user error."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if getattr(exc, "user_error", False):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def missing_config_value(exc: BaseException) -> str | None:
    """The key of a mandatory config value (``???``) that was never given, if that is what went wrong."""
    from omegaconf.errors import MissingMandatoryValue

    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MissingMandatoryValue):
            return getattr(exc, "full_key", None) or "a required config value"
        exc = exc.__cause__ or exc.__context__
    return None
