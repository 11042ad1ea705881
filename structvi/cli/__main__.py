"""``python -m structvi.cli`` is the ``structvi`` command."""

from structvi.cli import main

if __name__ == "__main__":
    main()
