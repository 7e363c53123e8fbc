"""``python -m lorafuse``: the same as the ``lorafuse`` command."""

from lorafuse.cli import main

if __name__ == "__main__":
    main()
