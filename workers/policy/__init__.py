"""When may a value leave this node, and at what cost: the doors a release goes through
(``doors``), the owner's approval queue (``approvals``), the privacy-budget ledger
(``ledger``), calibrating a DP release (``release``), declared bounds checked against the
data (``bounds``) and a model job's figures (``figures``)."""
