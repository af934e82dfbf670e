"""The one exception type for bad input: the CLI prints it as a single line and exits 2; and what a disk or
permission fault says (the CLI prints those as one line too)."""

import errno

# A full disk or quota, a read-only filesystem, a folder without write permission, a file over RLIMIT_FSIZE.
DISK_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})


class RacError(ValueError):
    """Bad input: the message names the bad value and the fix."""


def disk_fault(err: BaseException) -> bool:
    """Whether ``err`` is a disk or permission fault, which the user fixes, rather than a bug."""
    return isinstance(err, OSError) and err.errno in DISK_ERRNOS


def disk_message(err: OSError) -> str:
    """One line for a disk or permission fault: what could not be written (or opened), why, and the fix."""
    where = f" {str(err.filename)!r}" if err.filename is not None else ""
    if err.errno in (errno.EACCES, errno.EPERM):  # a read can be refused too
        return f"no permission for{where}: {err.strerror or err}; fix its permissions (or point --out elsewhere)"
    return (
        f"cannot write{where}: {err.strerror or err}; free disk space or make the folder writable "
        "(or point --out elsewhere), then rerun"
    )
