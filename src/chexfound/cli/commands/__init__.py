"""One module per CLI verb. Each defines `register(subparsers) -> None`; the parser it adds sets `func`."""
