"""Lines for the user on stderr, each in a single write.

Every rank of a job writes to the launcher's one stderr stream. ``print`` writes the text and its
newline separately, so another rank's line can land between them and two lines fuse into one
(seen with a checkpoint failure reported by both ranks). One ``write`` of a short line is one
system call, which a pipe keeps whole (POSIX: up to PIPE_BUF, 4 KiB on Linux).
"""
from __future__ import annotations

import sys


def stderr_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()
