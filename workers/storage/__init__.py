"""What a node keeps: its object store (``store``) and database tables (``tables``), the
owner's dataset files (``datasets``), claim-checked bytes on the broker (``claims``) and how
long a job's traces stay (``retention``)."""
