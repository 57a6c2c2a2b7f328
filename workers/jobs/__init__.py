"""Running one job at the node: the pipeline every job goes through (``runner``: verify →
authorize → validate → run → keep or release), what a job works with (``context``), jobs
without a model (``compute``) and with one (``model_jobs``, ``training``, ``dpsgd``), and
each requester's fair share of the worker's processes (``slots``)."""
