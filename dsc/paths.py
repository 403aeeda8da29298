"""Asking the filesystem about a path the user gave, without a traceback: a name too long, a
component that is a file, a folder we may not read are bad input naming the field, not crashes."""
from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Literal

from dsc.errors import DscInputError

# What the filesystem says of a path the user chose, or of a disk they pointed dsc at: bad input
# wherever it surfaces (the CLI maps these, with a file name, to exit 2). Other errors (EEXIST,
# EINVAL, EACCES…) are mapped only where a user's path is touched (`kind`, RunDir.claim).
USER_ERRNOS = {errno.ENAMETOOLONG, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR}


def kind(path: Path, field: str) -> Literal["file", "dir", "missing", "other"]:
    """What lies at `path`; a path the filesystem refuses to look up is an error naming `field`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "missing"
    except NotADirectoryError:  # a component of it is a file: nothing can lie there
        return "missing"
    except OSError as exc:
        raise refused(exc, field, path) from None
    except ValueError as exc:  # "embedded null byte"
        raise DscInputError(field, f"{str(path)!r} is not a usable path: {exc}") from None
    return "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other"


def refused(exc: OSError, field: str, path: Path | str | None = None) -> DscInputError:
    """An OSError about a user's path as bad input: the path, the reason, the fix."""
    where = path if path is not None else exc.filename
    reason = exc.strerror or str(exc)
    fix = {errno.ENAMETOOLONG: "shorten the path (each name at most 255 bytes)",
           errno.EROFS: "the filesystem is read-only: choose a writable folder",
           errno.ENOSPC: "the disk is full: free space or choose another disk",
           errno.EDQUOT: "the disk quota is exhausted: free space or choose another disk",
           errno.EACCES: "no permission: choose a folder you may write (or read)",
           errno.EPERM: "not permitted: choose another folder",
           errno.ENOTDIR: "a component of the path is a file, not a folder",
           errno.EISDIR: "a folder lies where a file is expected",
           errno.EEXIST: "a file lies where a folder is expected"}.get(exc.errno, "check the path")
    return DscInputError(field, f"{where}: {reason}: {fix}")
