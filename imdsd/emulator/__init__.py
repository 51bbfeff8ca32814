"""The IMDS emulator: a faithful stand-in for Azure IMDS, used by the demo, tests and benchmarks.

Sans-IO parts: :mod:`.state` (the emulated VM), :mod:`.rules` (IMDS request rules),
:mod:`.profiles` (azure / azurestack), :mod:`.scenario` (TOML timelines), :mod:`.faults`,
:mod:`.stats`, :mod:`.attested`, :mod:`.endpoints` and :mod:`.control` (answers). The trio shell
is :mod:`.server` (``serve_emulator``); :mod:`.cli` runs ``imdsd emulate``. Default documents
and the demo scenario ship in ``data/``.
"""
