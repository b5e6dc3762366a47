"""Every chapter of the book, in book order. Each chapter module declares itself once as ``CHAPTER`` (a
:class:`~fragile.book.chapter.Chapter`); this registry is what the runner, the table of contents and the tests
read. A new chapter is a module with its ``CHAPTER`` and one entry here."""

from __future__ import annotations

from fragile.book.chapter import Chapter
from fragile.chapters import appendix, estimands, imagenet, iris, mnist_cifar10, small_mnist

CHAPTERS: dict[str, Chapter] = {
    c.name: c
    for c in sorted(
        (m.CHAPTER for m in (iris, small_mnist, mnist_cifar10, imagenet, appendix, estimands)), key=lambda c: c.number
    )
}

__all__ = ["CHAPTERS"]
