"""The broker: owns the controller, the DMA ledger and every queue.

It authors every address the device sees (queue bases, PRP entries, PRP-list
pages, doorbell values, CC bits) from its own ledger, and validates every
request before anything touches the device: a refused request raises
:class:`~nvmevfio.errors.Refused` with a reason label and writes no register,
posts no entry and rings no doorbell.

One file per job (docs/architecture.md has the map): ``state`` (the lifecycle
enum, recovery and event state), ``core`` (bring-up, the queue pairs' memory),
``execute`` (queue ownership, a command start to end, reaping, SQE/PRP authoring,
bounce copies), ``commands`` (admin commands, then pending events), ``namespaces``
(identify, the table, window and MDTS refusals), ``queues`` (I/O queue creation,
shadow doorbells, shutdown), ``events``, ``recovery``, ``passthrough``, ``admin``
(the named verbs), ``submit`` (batches, registered buffers, perf loop),
``service`` (the daemon's C path), ``syncio``, ``zones`` (zoned namespaces); ``facade`` composes them as
:class:`Broker`.
"""

from nvmevfio.broker.common import (
    ABORT_TIMEOUT_S,
    ADMIN_DEPTH,
    CANCELLED_STATUS,
    COMMAND_TIMEOUT_S,
    DEFAULT_IO_DEPTH,
    DEFAULT_STAGING,
    DSM_MAX_RANGES,
    FORMAT_TIMEOUT_S,
    MAX_NLB,
    MAX_RETRIES,
    OACS_DBBUF,
    ONCS_DSM,
    ONCS_WRITE_ZEROES,
    RESET_LIMIT,
    RESET_WINDOW_S,
    SCALAR_BATCH,
    TRANSIENT,
    UNLIMITED_MDTS_CAP,
    BrokerQueue,
    IrqWaiter,
    Namespace,
    RegisteredBuffer,
)
from nvmevfio.broker.facade import Broker
from nvmevfio.broker.passthrough import BROKER_OWNED_ADMIN, BROKER_OWNED_FEATURES, PASSTHRU_DWORDS, PASSTHRU_MAX
from nvmevfio.broker.state import EVENT_BACKLOG, EVENT_POLL_S, MAX_AERS, BrokerState, Lifecycle

__all__ = [
    "ABORT_TIMEOUT_S", "ADMIN_DEPTH", "BROKER_OWNED_ADMIN", "BROKER_OWNED_FEATURES", "CANCELLED_STATUS",
    "COMMAND_TIMEOUT_S", "DEFAULT_IO_DEPTH", "DEFAULT_STAGING", "DSM_MAX_RANGES", "EVENT_BACKLOG", "EVENT_POLL_S",
    "FORMAT_TIMEOUT_S", "MAX_AERS", "MAX_NLB", "MAX_RETRIES", "OACS_DBBUF", "ONCS_DSM", "ONCS_WRITE_ZEROES",
    "PASSTHRU_DWORDS", "PASSTHRU_MAX", "RESET_LIMIT", "RESET_WINDOW_S", "SCALAR_BATCH", "TRANSIENT",
    "UNLIMITED_MDTS_CAP", "Broker", "BrokerQueue", "BrokerState", "IrqWaiter", "Lifecycle", "Namespace",
    "RegisteredBuffer",
]
