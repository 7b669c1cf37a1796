"""Private state directories: every file 0600, every directory 0700.

A state dir holds secrets (the join token, identity keys, sessions in SQLite) and what
strangers uploaded (job files, checkpoints). The CLI entry points set ``umask 0o077`` so that
everything created later is private; :func:`secure_state_dir` creates the directory 0700 and
repairs what was created before (older versions, other tools) at start.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_UMASK = 0o077
FILE_MODE = 0o600
DIR_MODE = 0o700


def private_umask() -> int:
    """Set the process umask so new files are 0600 and directories 0700; returns the old one."""
    return os.umask(PRIVATE_UMASK)


def _fix(path: str, mode: int, want: int) -> bool:
    if stat.S_IMODE(mode) == want:
        return False
    os.chmod(path, want)  # callers pass only what lstat saw as a regular file or directory
    return True


def secure_state_dir(state_dir: Path) -> int:
    """Create ``state_dir`` (0700) if needed and make every file under it 0600 and every
    directory 0700 (symlinks are neither followed nor changed). Returns how many were fixed."""
    root = Path(state_dir)
    root.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    fixed = int(_fix(str(root), root.stat().st_mode, DIR_MODE))
    for dirpath, dirnames, filenames in os.walk(root):  # os.walk does not follow symlinked dirs
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except FileNotFoundError:
                continue
            if stat.S_ISDIR(st.st_mode):
                fixed += _fix(path, st.st_mode, DIR_MODE)
            elif stat.S_ISREG(st.st_mode):
                fixed += _fix(path, st.st_mode, FILE_MODE)
    if fixed:
        log.warning("made %d files and directories under %s private (files 0600, directories 0700)", fixed, root)
    return fixed


def create_private_file(path: Path) -> None:
    """Create ``path`` empty with mode 0600 if it does not exist (whatever the umask)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        return
    os.close(fd)
