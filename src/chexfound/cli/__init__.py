"""The `chexfound` command. Each verb is a module in `chexfound.cli.commands` with a `register(subparsers)`."""
