"""The CLI's command handlers that outgrew a few lines in cli.py: flags in, one library call out.

Why it exists: cli.py stays a table of subcommands and their flags. A handler that has its own checks
of the flags (ranges, URLs) before it calls the library lives here, one module per command
(`search.py`: `evomerge search`). Only cli.py imports this package (tests/test_architecture.py); it
may import every room.
"""
