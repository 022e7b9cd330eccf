"""The local mirror a dataset is copied from, read as untrusted: only its own regular files, never written.

A mirror is a folder laid out as ``MIRROR/<dataset>/<path>`` (``--mirror`` or
``$MEDSEG_DATA_MIRROR``), often a shared one. Three rules keep `fetch` inside it:

- an entry is copied only if, once its links are resolved, it is a regular file inside the
  mirror: a link in it to ``/etc/passwd`` or another user's data is refused, whatever its
  checksum (a matching sha256 proves the bytes, not where they came from);
- a ``file://`` source_url is read only from inside the mirror;
- the dataset folder ``DEST/<dataset>`` must not overlap the mirror (equal, nested either way,
  or linked): links in ``DEST`` are followed, as `medseg predict` follows them in ``--output``,
  and where they lead is checked with the same rule (`medseg.pipeline.output.check_disjoint`).

Every file is opened ``O_NOFOLLOW | O_NONBLOCK`` and must be regular once open, so a link or a
FIFO swapped in after the checks is refused too, and opening a FIFO never waits for a writer.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
import urllib.request
from pathlib import Path
from typing import BinaryIO

from medseg.data.manifest import ManifestEntry, default_manifest_path
from medseg.errors import ManifestError

__all__ = ["check_dest", "local_source", "mirror_copy", "open_regular"]


def check_dest(dest: Path, dataset: str, mirror: Path | None) -> None:
    """The dataset folder must not overlap the mirror (equal, nested either way, or linked): the mirror is only read.

    Links in the data root are followed, as `medseg predict` follows them in ``--output`` (a data
    root on another disk is a link as often as not); where they lead is what is checked, with the
    same rule (`check_disjoint`: resolved paths, and device + inode for bind mounts).
    """
    from medseg.pipeline.output import OutputUnwritable, check_disjoint

    folder = dest / dataset
    try:
        real = folder.resolve()
    except (OSError, RuntimeError) as exc:
        raise ManifestError(
            f"{dest}: the data root cannot be resolved ({exc}); remove the link loop or choose another --dest"
        ) from None
    if mirror is None:
        return
    try:
        check_disjoint(mirror, folder)
    except OutputUnwritable:
        shown = mirror if mirror.resolve() == mirror else f"{mirror} ({mirror.resolve()})"
        raise ManifestError(
            f"{dest}: the data root puts {dataset} in {real} (links resolved), which overlaps the mirror {shown}; "
            "fetch only reads the mirror and never writes into it, so choose a --dest outside it (or check the "
            f"mirror's files in place with `medseg data list --dest {mirror}`)"
        ) from None


def local_source(entry: ManifestEntry, mirror: Path | None, manifest: Path | None) -> Path | None:
    """The mirror file a file:// source_url names; None for an https:// URL; ManifestError for anything else.

    Why: a manifest URL is untrusted. Plain http:// can be altered on the way (the sha256 would
    catch it, after the whole download), ftp://, gopher:// and data: have no place here, and a
    file:// URL could name any file or device (``/dev/zero`` never ends) unless it is confined
    to the mirror folder the user chose.
    """
    url = entry.source_url
    where = manifest or default_manifest_path()
    name = f"{entry.dataset}/{entry.path}"
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https" and parts.hostname:
        return None
    if scheme != "file":
        shown = (
            "an https:// URL with no host"
            if scheme == "https"
            else f"a {scheme}: URL"
            if scheme
            else "not a URL (it has no scheme)"
        )
        raise ManifestError(
            f"{url}: is {shown}, and medseg downloads {name} only over https://; change its source_url in {where} "
            "to an https:// address, or pass --mirror DIR holding the file"
        )
    if mirror is None:
        raise ManifestError(
            f"{url}: file:// sources are read only from a local mirror, and none was given for {name}; pass "
            "--mirror DIR (or set MEDSEG_DATA_MIRROR) naming the folder that holds it, or use an https:// URL"
        )
    try:
        path = Path(urllib.request.url2pathname(parts.path)).resolve()
        inside = parts.netloc in ("", "localhost") and path.is_relative_to(mirror.resolve())
    except (OSError, RuntimeError, ValueError):
        inside = False
    if not inside:
        raise ManifestError(
            f"{url}: lies outside the mirror {mirror} (after links), so {name} was not read from it; point the "
            "source_url into the mirror folder, or pass --mirror DIR naming the folder that holds it"
        )
    if not path.is_file():
        raise ManifestError(
            f"{url}: is not a regular file in the mirror {mirror}, so {name} was not read; put the file there "
            "or fix its source_url"
        )
    return path


def mirror_copy(mirror: Path, entry: ManifestEntry) -> Path | None:
    """The mirror's own regular file for ``entry`` (links resolved); None where the mirror has nothing at its path.

    Why: the mirror is only read, and only its own files are copied. A link in it to ``/etc/passwd``
    or to another user's data would otherwise land in the dataset folder (its checksum proves only
    that the bytes are the declared ones, not where they came from), and a FIFO would block the copy.
    """
    source = mirror / entry.dataset / entry.path
    if not os.path.lexists(source):
        return None
    name = f"{entry.dataset}/{entry.path}"
    try:
        real = source.resolve()
        inside = real.is_relative_to(mirror.resolve())
    except (OSError, RuntimeError) as exc:
        raise ManifestError(
            f"{source}: cannot be resolved ({exc}), so {name} was not copied from the mirror; remove the link loop"
        ) from None
    if not inside:
        raise ManifestError(
            f"{source}: leads through a link to {real}, outside the mirror {mirror}, so {name} was not copied; "
            "replace the link with the file itself (or with a link that stays inside the mirror)"
        )
    if not real.is_file():
        raise ManifestError(
            f"{source}: is {_not_regular(source, real)} in the mirror {mirror}, not a regular file, so {name} was "
            "not copied; put the file itself there, or remove the entry to download it from its source_url"
        )
    return real


def _not_regular(source: Path, real: Path) -> str:
    """What a mirror entry that is no regular file is, in words."""
    if not real.exists():
        return f"a link to {real}, which does not exist"
    link = f"a link to {real}, which is " if source.is_symlink() else ""
    if real.is_dir():
        return f"{link}a folder"
    kinds = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a device", stat.S_IFBLK: "a device"}
    return link + kinds.get(stat.S_IFMT(real.stat().st_mode), "a special file")


def open_regular(path: Path) -> BinaryIO:
    """``path`` opened for reading if, once open, it is a regular file: a link or FIFO swapped in after
    the checks is refused (O_NOFOLLOW; O_NONBLOCK so opening a FIFO does not wait for a writer)."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(f"{path} is no longer a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
