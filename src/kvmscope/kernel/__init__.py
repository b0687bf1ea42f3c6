"""Facts about kernels and hosts: rulesets per kernel version (``rulesets``) and host profiles (``profile``).

Both backends' tools read them (``capture``, ``check``, ``probe``); the model applies them.
"""
