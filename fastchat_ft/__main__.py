"""`python -m fastchat_ft` (what torchrun launches) is the same as the `fastchat-ft` command."""
from fastchat_ft.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
