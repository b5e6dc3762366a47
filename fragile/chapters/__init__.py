"""The chapters: one module per section of the book, each built on the core and the shared protocol
(:mod:`fragile.chapters.protocol`, :mod:`fragile.chapters.table1_protocol`) and never on another chapter.
:mod:`fragile.chapters.registry` lists them."""
