"""The chapters: one module per section of the book, each built on the core and never on another chapter."""
