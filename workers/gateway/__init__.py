"""The gateway worker: the grid's registry of enrolled and registered nodes and their
datasets (``registry``), the nonces it has seen (``nonces``), and the service behind the
``gateway`` queue that registers, publishes and searches (``service``). It is a worker, not
part of the data scientist's client: ``ops.gateway`` runs it, ``ops.enrol`` enrols nodes in
its registry."""
