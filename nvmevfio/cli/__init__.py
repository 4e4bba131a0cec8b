"""The ``nvmevfio`` command line, one module per command group (common: the group, options,
exit codes and error handling they share; COMMAND_GROUPS: which module holds which command).

Output follows nvme-cli's conventions: ``-o json`` for scripts (the field names of
``nvme id-ctrl/id-ns/smart-log -o json``), ``-n`` for the namespace id. Errors are
one line with the refusal reason or the NVMe status name and what to do next,
and a non-zero exit code; ``-v`` adds detail.
"""

from nvmevfio.cli.common import COMMAND_GROUPS, main  # each group's module is imported on first use

__all__ = ["COMMAND_GROUPS", "main"]
