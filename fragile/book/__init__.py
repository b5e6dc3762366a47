"""The book layer: what every chapter shares (config base, banner, provenance block), plots and widgets."""
