"""``python -m coatnet_export`` is the ``coatnet-export`` command."""

from coatnet_export.cli import main

main()
