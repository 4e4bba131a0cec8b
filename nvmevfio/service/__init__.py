"""The broker as a service: ``nvmevfio serve`` (daemon.py: the event loop; connections.py: admission
and control messages; validated.py: the validated lane; session.py: a client's session), its
clients (client.py), the control messages between them (protocol.py), the shared rings
(ring.py), the grants file (grants.py) and the Model B validator (validator.py). This module
imports nothing, so the CLI can name the default socket cheaply."""

DEFAULT_SOCKET = "/run/nvmevfio/nvmevfio.sock"
