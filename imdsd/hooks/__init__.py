"""Hooks: run scripts on changes, safely and at least once (CONTRACT section 5).

``load_hooks(config)`` builds the hook list (again on SIGHUP); ``HookDispatcher`` runs them
over the store (a :class:`HookLedger`) whenever its revision advances.
"""
