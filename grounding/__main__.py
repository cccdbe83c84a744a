"""``python -m grounding``: the ``grounding`` command, for when its script is not on PATH
(a virtual environment not activated, ``pip install --user`` without ``~/.local/bin``)."""

from grounding.cli import app

if __name__ == "__main__":
    app(prog_name="grounding")
