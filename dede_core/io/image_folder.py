"""An image folder as a source: every image under a directory, the top-level subfolder naming the class."""

from __future__ import annotations

import os

from dede_core.io.source_base import (ACCEPTED, IMAGE_EXTENSIONS, Sample, _SURROGATE, _escape_surrogate, _index,
                                      _read_file, clean_key)


class ImageFolderSource:
    """Images under a directory, recursively; the top-level subfolder names the class.

    Links are followed only while their target stays inside the root (a folder assembled from symlinked subsets
    works); a link leading outside it is listed in `skipped` unless follow_external_links. A directory named
    like an image, a broken link and a link loop are listed in `skipped` too: nothing is read from outside SRC
    unless asked, and nothing is left out silently.
    """

    def __init__(self, root: str, *, follow_external_links: bool = False) -> None:
        self.root = os.path.abspath(root)
        self.skipped: list[tuple[str, str]] = []
        rels = self._walk(os.path.realpath(self.root), follow_external_links)
        if not rels:
            raise ValueError(f"no images ({' '.join(IMAGE_EXTENSIONS)}) found under {root}; expected {ACCEPTED}")
        rels.sort()
        self._paths = rels
        self._keys = [clean_key(os.path.splitext(rel)[0]) for rel in rels]
        self._check_unique()
        top = [rel.split("/", 1)[0] if "/" in rel else None for rel in rels]
        names = sorted({t for t in top if t is not None})
        self.classes: list[str] | None = names or None
        index = {name: i for i, name in enumerate(names)}
        self._labels = [None if t is None else index[t] for t in top]

    def _skip(self, rel: str, reason: str) -> None:
        self.skipped.append((clean_key(os.path.splitext(rel)[0]), f"{rel}: {reason}"))

    def _outside(self, path: str, real_root: str) -> bool:
        return os.path.commonpath([os.path.realpath(path), real_root]) != real_root

    def _walk(self, real_root: str, follow_external: bool) -> list[str]:
        """Relative paths of the image files, listing in `skipped` what is passed over and why."""
        rels = []
        for dirpath, dirnames, filenames in os.walk(self.root, followlinks=True):
            for name in sorted(dirnames):
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                    self._skip(rel, "a directory named like an image (its files are read one by one)")
                real = os.path.realpath(full)
                why = None
                if os.path.islink(full) and self._outside(full, real_root) and not follow_external:
                    why = f"link to {real}, outside the source root (pass --follow-external-links to read it)"
                elif os.path.islink(full) and os.path.commonpath([real, os.path.realpath(dirpath)]) == real:
                    why = f"link loop: {real} holds this link"
                if why:
                    self._skip(rel, why)
                    dirnames.remove(name)
            for name in filenames:
                if os.path.splitext(name)[1].lower() not in IMAGE_EXTENSIONS:
                    continue
                full = os.path.join(dirpath, name)
                rel = os.path.relpath(full, self.root).replace(os.sep, "/")
                if os.path.islink(full):
                    if not os.path.exists(full):
                        self._skip(rel, f"broken link to {os.readlink(full)}")
                        continue
                    if not os.path.isfile(full):
                        self._skip(rel, "link to something that is not a file")
                        continue
                    if self._outside(full, real_root) and not follow_external:
                        self._skip(rel, f"link to {os.path.realpath(full)}, outside the source root (pass "
                                        f"--follow-external-links to read it)")
                        continue
                elif not os.path.isfile(full):
                    self._skip(rel, "not a regular file")
                    continue
                rels.append(rel)
        return rels

    def _check_unique(self) -> None:
        by_key: dict[str, list[str]] = {}
        for key, rel in zip(self._keys, self._paths):
            by_key.setdefault(key, []).append(rel)
        clashes = {k: v for k, v in by_key.items() if len(v) > 1}
        if clashes:
            shown = "; ".join(f"{k!r}: {', '.join(v)}" for k, v in list(clashes.items())[:10])
            raise ValueError(
                f"{len(clashes)} sample key collision(s) under {self.root} (keys drop the extension and "
                f"replace '.' with '_'); rename or remove one file of each group: {shown}"
            )

    def __len__(self) -> int:
        return len(self._paths)

    def __getitem__(self, i: int) -> Sample:
        i = _index(i, len(self._paths))
        rel = self._paths[i]
        data = _read_file(os.path.join(self.root, rel))
        return Sample(key=self._keys[i], data=data, label=self._labels[i], meta={"path": rel})

    def keys(self) -> list[str]:
        return list(self._keys)

    def item(self, i: int) -> tuple[str, str]:
        """(the sample's name in the source, the file whose size and mtime fingerprint it)."""
        rel = self._paths[_index(i, len(self._paths))]
        return _SURROGATE.sub(_escape_surrogate, rel), os.path.join(self.root, rel)
