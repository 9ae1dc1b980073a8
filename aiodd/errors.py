"""One exception hierarchy for everything aiodd reports.

Two families, after h11: :class:`UsageError` is *you asked for something invalid*
(operands, options, paths), :class:`ImageError` is *the image is invalid* (corrupt,
unsupported or hostile input).  The CLI turns any :class:`AioddError` into one line on
stderr and exit status 1.
"""

from __future__ import annotations


class AioddError(Exception):
    """Base class of every error aiodd raises on purpose."""


class UsageError(AioddError, ValueError):
    """An operand, option or argument is invalid.

    An error made by :meth:`invalid` is about one option's value, ``invalid NAME VALUE:
    RULE``: ``option`` is then the library's name for it (``bs``, ``isolation``,
    ``allow_backing``), and :meth:`naming` gives the message with another spelling of
    it, such as the command line's ``--isolation``.  Otherwise ``option`` is None.
    """

    option: str | None = None
    value: str = ""  # as the message shows it: quoted, or a repr
    rule: str = ""

    @classmethod
    def invalid(cls, option: str, value: str, rule: str) -> UsageError:
        exc = cls(f"invalid {option} {one_line(value)}: {rule}")
        exc.option, exc.value, exc.rule = option, one_line(value), rule
        return exc

    def naming(self, option: str) -> str:
        """The message, with ``option`` as the name of the value at fault."""
        if self.option is None:
            return str(self)
        return f"invalid {option} {self.value}: {self.rule}"


class ImageError(AioddError):
    """An input image is corrupt, unsupported or refers to something it may not.

    ``file`` is the image's name as the user (or the referring image) spelled it;
    ``fmt`` the format being decoded, when known.
    """

    def __init__(self, file: str, message: str, fmt: str | None = None) -> None:
        # Names and text quoted from an image reach a terminal: one line, no escapes.
        self.file = one_line(file)
        self.fmt = fmt
        self.detail = one_line(message)
        super().__init__(f"{self.file}: {self.detail}")


class UnsupportedImageError(ImageError):
    """The image is valid but uses a feature aiodd does not read."""


class PolicyError(ImageError):
    """An image refers to a file the backing-file policy does not allow.

    ``allowable`` says whether trusting more directories would allow the file (True),
    whether nothing would (False), or is None when the message says it already.  The
    message names the library's parameter; :meth:`naming` names another spelling of
    it, such as the command line's ``--allow-backing DIR``.
    """

    LIBRARY_OPTION = "allow_backing=[DIR]"

    def __init__(
        self, file: str, message: str, fmt: str | None = None, *, allowable: bool | None = None
    ) -> None:
        self.rule = message
        self.allowable = allowable
        super().__init__(file, _with_hint(message, allowable, self.LIBRARY_OPTION), fmt)

    def naming(self, option: str) -> str:
        """The message, with ``option`` as the way to allow the file."""
        return f"{self.file}: {one_line(_with_hint(self.rule, self.allowable, option))}"


class InUseError(PolicyError):
    """A file of the input is in use by another process, which qemu's image locks say.

    ``forceable`` says whether sharing the file anyway (``-U``, ``force_share=True``)
    would read it; the message names the library's parameter, :meth:`naming` another
    spelling of it.  A :class:`PolicyError`, so that it reaches the caller unchanged
    from wherever the chain is opened.
    """

    LIBRARY_OPTION = "force_share=True"

    def __init__(
        self, file: str, message: str, fmt: str | None = None, *, forceable: bool = False
    ) -> None:
        self.forceable = forceable
        super().__init__(file, self._hinted(message, forceable, self.LIBRARY_OPTION), fmt)
        self.rule = message

    @staticmethod
    def _hinted(message: str, forceable: bool, option: str) -> str:
        return f"{message}; use {option} to read it anyway" if forceable else message

    def naming(self, option: str) -> str:
        return f"{self.file}: {one_line(self._hinted(self.rule, self.forceable, option))}"


def _with_hint(message: str, allowable: bool | None, option: str) -> str:
    if allowable is None:
        return message
    return f"{message} ({f'allow it with {option}' if allowable else 'no option allows this'})"


class OutputError(AioddError):
    """The output could not be created, written or put in place."""


class StageError(AioddError):
    """A pipeline stage failed for a reason that is not an :class:`AioddError` itself."""

    def __init__(self, stage: str, cause: BaseException) -> None:
        self.stage = stage
        self.cause = cause
        super().__init__(f"{stage} stage failed: {describe(cause)}")


class IsolationError(AioddError):
    """The guest reader could not be started, died, or was killed by the watchdog."""


def one_line(text: str) -> str:
    """``text`` with every unprintable character (newline, escape...) spelled out, so
    that it stays one harmless line on a terminal; idempotent."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def describe(exc: BaseException) -> str:
    """A one-line human description of an exception (``OSError`` without the errno noise)."""
    if isinstance(exc, OSError) and exc.strerror:
        where = f"{exc.filename}: " if exc.filename else ""
        return f"{where}{exc.strerror}"
    text = str(exc)
    return text if text else type(exc).__name__
