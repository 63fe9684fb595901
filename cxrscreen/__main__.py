"""``python -m cxrscreen ...``: the same commands as the ``cxrscreen`` script (for an environment whose
scripts folder is not on the PATH, or to pick the interpreter explicitly)."""

from .cli import main

if __name__ == "__main__":
    main(prog_name="cxrscreen")
