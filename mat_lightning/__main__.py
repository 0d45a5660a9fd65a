"""``python -m mat_lightning`` is the ``mat`` command."""

from mat_lightning.main import main

main()
