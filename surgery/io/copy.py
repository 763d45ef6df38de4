"""Kernel-side byte copies between files: tensors a plan only copies never pass through Python.

    copy_range(src_fd, dst_fd, src_offset, dst_offset, count)    # -> the method that did the copy

``os.copy_file_range`` first (in-kernel, reflinks on filesystems that share extents), then
``os.sendfile`` (in-kernel, from the page cache), then positioned reads and writes through one
reused buffer. A method that the kernel or filesystem refuses (cross-device, unsupported) is not
tried again in this process. ``METHODS`` is the order tried; tests shorten it to force fallbacks.
"""

from __future__ import annotations

import errno
import os

METHODS: tuple[str, ...] = ("copy_file_range", "sendfile", "buffered")
BUFFER_BYTES = 8 << 20
# errors meaning "this method does not work for these files", not "the copy failed"
_UNSUPPORTED = {errno.EXDEV, errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EBADF,
                errno.EPERM}
_refused: set[str] = set()


def copy_range(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, count: int,
               methods: tuple[str, ...] | None = None) -> str:
    """Copy ``count`` bytes from ``src_fd`` at ``src_offset`` to ``dst_fd`` at ``dst_offset``.

    Returns the name of the method that finished the copy. Partial progress of a method that
    fails midway is kept and the next method continues from there.
    """
    done = 0
    for method in methods or METHODS:
        if method in _refused and method != "buffered":
            continue
        try:
            done += _COPIERS[method](src_fd, dst_fd, src_offset + done, dst_offset + done, count - done)
        except OSError as e:
            if e.errno not in _UNSUPPORTED or method == "buffered":
                raise
            _refused.add(method)
            continue
        if done == count:
            return method
    raise OSError(errno.EIO, f"copied {done} of {count} bytes: the source file ends early")


def _copy_file_range(src: int, dst: int, src_off: int, dst_off: int, count: int) -> int:
    done = 0
    while done < count:
        n = os.copy_file_range(src, dst, count - done, src_off + done, dst_off + done)
        if n == 0:  # end of the source file, or a filesystem that copies nothing: let the next method decide
            break
        done += n
    return done


def _sendfile(src: int, dst: int, src_off: int, dst_off: int, count: int) -> int:
    os.lseek(dst, dst_off, os.SEEK_SET)  # sendfile writes at the output's file position
    done = 0
    while done < count:
        n = os.sendfile(dst, src, src_off + done, count - done)
        if n == 0:
            break
        done += n
    return done


def _buffered(src: int, dst: int, src_off: int, dst_off: int, count: int) -> int:
    buf = bytearray(min(BUFFER_BYTES, max(count, 1)))
    view = memoryview(buf)
    done = 0
    while done < count:
        n = os.preadv(src, [view[:min(len(buf), count - done)]], src_off + done)
        if n == 0:
            break
        written = 0
        while written < n:
            written += os.pwrite(dst, view[written:n], dst_off + done + written)
        done += n
    return done


_COPIERS = {"copy_file_range": _copy_file_range, "sendfile": _sendfile, "buffered": _buffered}
