"""``python -m nvmevfio``: the command line."""

from nvmevfio.cli import main

main(prog_name="nvmevfio")
