"""The broker as a service: ``nvmevfio serve`` (daemon.py), its clients (client.py), the
shared rings between them (ring.py), the grants file (grants.py) and the Model B validator
(validator.py). This module imports nothing, so the CLI can name the default socket cheaply."""

DEFAULT_SOCKET = "/run/nvmevfio/nvmevfio.sock"
